#pragma once
/// smp.save / smp.load for partial (per model-parallel rank) and full
/// checkpoints, with the commit protocol that makes a partial checkpoint
/// visible only when every participant has written its part.
///
///   smp::ckpt::SaveOptions opts;                       // partial, participants: MP_GROUP
///   if (smp::rdp_rank() == 0) smp::ckpt::save(state, "/ckpt/model", opts);
///   smp::ckpt::Value mine = smp::ckpt::load("/ckpt/model");   // this rank's part
///
/// Participants of a partial save: the caller's MP_GROUP (one file per
/// (pp_rank, tp_rank), written by the ranks with rdp_rank 0; callers with another
/// rdp_rank hold replicas and skip), or with `v3` (sharded optimizer state) the
/// WORLD (one file per rank). A full save involves only the caller. The protocol
/// is in docs/file_format.md ("Commit protocol").

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/value.h"

namespace smp {
namespace ckpt {

struct SaveOptions {
  /// One file per model-parallel rank (true) or one file written by the caller.
  bool partial = true;
  /// Sharded optimizer state: every rank writes `<f>_<pp>_<tp>_<rdp>`.
  bool v3 = false;
  /// Appended after the rank part of partial names ("" or ".pt").
  std::string suffix;
  /// Seconds to wait for the other participants; <= 0: SMP_CHECKPOINT_TIMEOUT
  /// (default 600).
  double timeout_s = 0;
  WriteOptions write;
};

struct SaveStats {
  std::string file;      ///< this rank's file (final name); empty when skipped
  bool skipped = false;  ///< a replica (rdp_rank > 0) of a non-v3 partial save
  std::string save_id;
  std::uint64_t bytes = 0;
  double seconds = 0;
  double serialize_seconds = 0;   ///< pickling and device -> host copies
  double write_seconds = 0;       ///< pwrite + CRC-32
  double fsync_seconds = 0;       ///< fsync of the file and its directory
  double rendezvous_seconds = 0;  ///< waiting for the other participants
  double commit_seconds = 0;      ///< manifest, renames, directory fsyncs
  /// Where the time went, finer than the phases (WriteStats::profile, and
  /// the commit's "commit_wait_written", "commit_manifest", "commit_rename",
  /// "commit_cleanup", "commit_wait_renamed").
  std::map<std::string, double> profile;
  double gbps() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
};

/// One collective save, split so that the file can be written by any writer
/// (smp's write_file, or torch.save for objects smp's format does not hold):
///
///   SaveSession s(f, opts);          // agrees on a save id with the participants
///   write_file(s.temporary_path(), obj, s.write_options());
///   SaveStats st = s.commit(written); // rendezvous, manifest, renames
///
/// When the writer fails, call abort(why) (the destructor does it too): the
/// other participants then fail at once with `why` instead of timing out.
class SaveSession {
 public:
  /// Collective among the participants (see the file comment). Throws
  /// CheckpointError naming the missing ranks when the lowest participant does
  /// not publish a save id within the timeout.
  SaveSession(const std::string& f, const SaveOptions& options);
  ~SaveSession();
  SaveSession(const SaveSession&) = delete;
  SaveSession& operator=(const SaveSession&) = delete;

  /// True for a replica that writes nothing (commit() returns at once).
  bool skipped() const;
  const std::string& save_id() const;
  /// This rank's final file name.
  const std::string& path() const;
  /// Where this rank writes before the commit: "<path>.tmp-<save id>".
  const std::string& temporary_path() const;
  /// The options' WriteOptions with the save id and the layout in `info`.
  WriteOptions write_options() const;
  /// Rendezvous, manifest, rename, final rendezvous: returns when the whole
  /// checkpoint is complete. `smp_index`: the file was written by write_file.
  /// Throws CheckpointError naming missing or failed participants; the previous
  /// checkpoint under `f` is left as it was unless the manifest was committed.
  SaveStats commit(const WriteStats& written, bool smp_index = true);
  /// Publishes a failure of this participant and removes its temporary file.
  void abort(const std::string& why);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// SaveSession + write_file + commit. Waits first for an asynchronous save
/// still in flight and throws its error, if it failed (wait_for_pending_saves).
SaveStats save(const Value& object, const std::string& f, const SaveOptions& options = {});

/// The handle of an asynchronous save (async_save). Copyable; all copies
/// refer to the same save.
///
///   smp::ckpt::AsyncSave h = smp::ckpt::async_save(state, "/ckpt/model");
///   // ... training changes the parameters; the file holds the snapshot ...
///   smp::ckpt::SaveStats st = h.wait();   // or poll h.done()
class AsyncSave {
 public:
  AsyncSave() = default;  ///< no save: done() is true, wait() returns {}
  /// True once the background write and commit ended (with success or an error).
  bool done() const;
  /// Waits for the save; returns the stats of its (last) file, or throws its
  /// error, which names the file and the rank. An error is thrown once: by
  /// wait() or by the next save, whichever comes first.
  SaveStats wait();
  /// Seconds the caller spent in async_save (the snapshot: device -> host
  /// copies into the pinned snapshot arena, CPU tensors copied too).
  double snapshot_seconds() const;
  /// Bytes of tensor data in the snapshot.
  std::uint64_t snapshot_bytes() const;

  struct State;
  explicit AsyncSave(std::shared_ptr<State> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<State> state_;
};

/// One save of an asynchronous job.
struct AsyncSaveItem {
  Value object;
  std::string f;
  SaveOptions options;
};

/// Snapshots `object` (every tensor copied into the process's snapshot arena:
/// pinned host memory when CUDA is available, allocated once and grown only
/// when a larger state comes, reused by the next save), then returns; a
/// background thread writes the file and runs the commit protocol (its
/// rendezvous goes through the job's store, never through the communicators,
/// so the caller's collectives go on meanwhile). Waits first for the save
/// still in flight (one at a time) and throws its error if it failed. The
/// next save (sync or async), smp::ckpt::load, smp::shutdown() and process
/// exit wait for this one. Collective like save(): every participant calls it.
AsyncSave async_save(const Value& object, const std::string& f, const SaveOptions& options = {});
/// Several saves snapshotted together and written one after the other by the
/// same background thread, then `then` (when given; its error counts as the
/// job's). save_checkpoint's asynchronous form.
AsyncSave async_save_all(std::vector<AsyncSaveItem> items, std::function<void()> then = {});
/// Waits for the asynchronous save in flight, if any; throws its error when
/// it failed and nobody was told yet.
void wait_for_pending_saves();
/// True while an asynchronous save is in flight.
bool save_in_flight();

struct LoadOptions {
  bool partial = true;
  ReadOptions read;
};

struct LoadStats {
  std::string file;  ///< the file read
  bool smp_index = false;  ///< written by smp (false: a plain torch.save file)
  std::string save_id;
  std::uint64_t bytes = 0;
  double seconds = 0;
  double open_seconds = 0;         ///< resolving the name, manifest, ZIP directory, index
  double read_seconds = 0;         ///< tensor records read and CRC-checked
  double deserialize_seconds = 0;  ///< unpickling data.pkl, building the object
  /// Where read_seconds went (ReadStats::profile).
  std::map<std::string, double> profile;
  double gbps() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
};

/// The file smp.load(f, partial) reads on this rank, after checking it
/// against the manifest (see docs/file_format.md, "Loading"). Throws
/// CheckpointError for an incomplete, mixed or missing part or a layout that
/// differs from this job's. Requires smp::init() when `partial`.
std::string resolve_load_path(const std::string& f, bool partial, LoadStats* stats = nullptr);

/// True when the manifest of partial checkpoint `f` records a layout this
/// job's part cannot be read from as is: another pipeline or tensor degree, or
/// sharded optimizer state saved with another rdp degree. False when `f` has no
/// manifest or smp is not initialized. resolve_load_path refuses exactly these;
/// smp.load(partial=True) reshards them (python/smp/_reshard.py).
bool saved_layout_differs(const std::string& f);

/// Reads this rank's part (partial) or `f` (full) with the restricted reader.
Value load(const std::string& f, const LoadOptions& options = {}, LoadStats* stats = nullptr);

/// SMP_CHECKPOINT_TIMEOUT in seconds (default 60); ConfigError when malformed.
double default_checkpoint_timeout_s();

/// "save 3.21 GB in 1.20 s (2.68 GB/s): serialize ..., write ..., ..."
std::string describe(const SaveStats& stats);
std::string describe(const LoadStats& stats);

}  // namespace ckpt
}  // namespace smp
