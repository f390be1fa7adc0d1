#pragma once
/// The smp checkpoint file format: one file = one torch.save-compatible ZIP
/// archive that stock `torch.load(f, weights_only=True)` reads back as the
/// saved object, plus a record `<archive>/smp/index.json` that locates every
/// tensor's bytes, so that a reader can fetch any byte range of any tensor
/// without unpickling anything.
///
/// Layout (all records stored, uncompressed):
///   <a>/data.pkl                pickle protocol 2, torch.save conventions
///   <a>/.format_version         "1"
///   <a>/.storage_alignment      alignment of record data, in bytes
///   <a>/byteorder               "little"
///   <a>/data/<key>              contiguous bytes of one tensor, aligned
///   <a>/version                 "3\n"
///   <a>/.data/serialization_id
///   <a>/smp/index.json          {"format": "smp.checkpoint", "format_version": 1,
///                                "smp_version", "info", "tensors": [...]}
/// `<a>` is the file's stem, as torch.save names it. Writes are atomic: the
/// file appears under its name only once complete and durable.

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "smp/checkpoint/value.h"
#include "smp/core/shard_spec.h"

namespace smp {
namespace ckpt {

/// Version of the index record this library writes (and the newest it reads).
constexpr int kFormatVersion = 1;

/// Defaults of checkpoint I/O derived from the machine, each overridable by
/// an environment variable (read at every call):
///   SMP_CKPT_THREADS   I/O threads per file (default: half the cores, at least 4, at most 8)
///   SMP_CKPT_POOL_MB   host staging pool in MiB, pinned when CUDA is available
///                      (default 2 x threads x 16 MiB): bounds the host memory of a save
///   SMP_CKPT_O_DIRECT  1: write tensor data with O_DIRECT where the file system allows it
///   SMP_CKPT_WRITEBACK 0: do not start each chunk's write-out to the disk as soon as it
///                      is written (default 1: the disk works during the save, and the
///                      final fsync waits for less)
struct IoDefaults {
  int threads = 4;
  std::size_t pool_bytes = 0;
  bool o_direct = false;
  bool early_writeback = true;
};
/// Throws ConfigError naming the variable when one is malformed.
IoDefaults io_defaults();

struct WriteOptions {
  /// Alignment of every record's data in the file: a power of two in
  /// [64, 65536]. 4096 lets readers use O_DIRECT and mmap pages.
  std::size_t alignment = 4096;
  /// Worker threads that write tensor chunks to the file and checksum them;
  /// 0: io_defaults().threads.
  int threads = 0;
  /// Host staging pool for device tensors in bytes (device -> host copies
  /// overlap the writes of chunks already copied); 0: io_defaults().pool_bytes.
  std::size_t pool_bytes = 0;
  /// Write tensor data with O_DIRECT (bypassing the page cache) where the file
  /// system allows it; unset: io_defaults().o_direct.
  std::optional<bool> o_direct;
  /// fsync the file and its directory before returning (durable checkpoint).
  bool fsync = true;
  /// Write through "<path>.tmp-<pid>" and rename it over `path` (true), or
  /// write `path` itself (false: `path` is already the caller's temporary
  /// name, as SaveSession::temporary_path(), which SaveSession::commit renames:
  /// each part is renamed once).
  bool atomic = true;
  /// Free-form strings recorded in the index ("info").
  std::map<std::string, std::string> info;
  /// Testing: write ZIP64 structures even when no offset or size needs them.
  bool force_zip64 = false;
  /// Testing: stage CPU tensors through the host pool like device tensors
  /// (exercises the pipeline of device saves on machines without a GPU).
  bool stage_host_tensors = false;
};

struct WriteStats {
  /// Size of the file written.
  std::uint64_t bytes = 0;
  /// Bytes of tensor data (storage records).
  std::uint64_t tensor_bytes = 0;
  /// Tensor leaves in the object, and distinct storage records written.
  std::size_t tensors = 0;
  std::size_t records = 0;
  /// Wall time of the whole call and of its phases.
  double seconds = 0;
  double pickle_seconds = 0;  // object -> data.pkl and layout
  double copy_seconds = 0;    // device -> host copies (overlapped with the writes since
                              // the pipelined save: the time the copies themselves took)
  double write_seconds = 0;   // pwrite + CRC-32 of all records (copies overlapped)
  double sync_seconds = 0;    // fsync, rename, directory fsync
  /// Where the time went, finer than the phases: "threads", and seconds
  /// summed over the writer threads in "pwrite", "crc32", "writeback" (early
  /// writeback requests) and "idle" (waiting for staged chunks); the calling
  /// thread's "d2h_copy" and "slot_wait"; "small_records" (index, pickle,
  /// headers) and "fsync" of the file.
  std::map<std::string, double> profile;
};

/// Writes `object` to `path` atomically: the bytes go to `<path>.tmp-<pid>`,
/// which is fsynced and renamed over `path` (then the directory is fsynced);
/// with `options.atomic` false straight to `path`. On any error the temporary
/// is removed and an existing `path` is left as it was. Tensors may live on any device (they are copied to host) and have any
/// strides (they are written contiguous). Throws CheckpointError naming the
/// file, the failing call and the system's error text.
WriteStats write_file(const std::string& path, const Value& object,
                      const WriteOptions& options = {});

/// Gives the bytes of one tensor record for write_file_streaming: called with
/// the placeholder tensor of `object` (its dtype and numel matter, not its
/// data: e.g. torch.empty(()).expand(shape)); returns a tensor of that dtype
/// and numel (any device, any strides), which is written and released before
/// the next call.
using TensorProducer = std::function<at::Tensor(const at::Tensor& placeholder)>;

/// write_file, with each tensor record's bytes produced on demand, one record
/// at a time in file order: peak memory is the largest record (plus what the
/// producer holds), whatever the object's size. Used to write full
/// checkpoints gathered or assembled tensor by tensor (consolidation, export).
WriteStats write_file_streaming(const std::string& path, const Value& object,
                                const TensorProducer& produce,
                                const WriteOptions& options = {});

/// Where one tensor's bytes are in a file.
struct TensorEntry {
  /// Keys from the root to the tensor: dict keys (ints in decimal, other
  /// non-str keys as their repr), list/tuple positions in decimal.
  std::vector<std::string> path;
  /// Storage record key: the bytes are in record "<archive>/data/<key>".
  std::string key;
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  /// In elements, from the start of the storage record.
  std::int64_t storage_offset = 0;
  /// Absolute file offset of the storage record's data.
  std::uint64_t offset = 0;
  /// Bytes of the tensor: numel * element size.
  std::uint64_t nbytes = 0;
  /// Bytes of the whole storage record (== nbytes in files smp writes).
  std::uint64_t storage_nbytes = 0;
  /// CRC-32 of the whole storage record.
  std::uint32_t crc32 = 0;
  std::optional<ShardSpec> shard;

  /// True when the tensor's bytes are one contiguous block (row-major).
  bool contiguous() const;
};

struct Index {
  int format_version = kFormatVersion;
  std::string smp_version;
  std::map<std::string, std::string> info;
  /// One entry per tensor leaf, depth first (tied tensors: one per leaf,
  /// sharing the key).
  std::vector<TensorEntry> tensors;

  /// The entry with exactly this path; nullptr when there is none.
  const TensorEntry* find(const std::vector<std::string>& path) const;
};

struct ReadOptions {
  /// Verify the CRC-32 of every record read (CorruptCheckpointError on mismatch).
  bool verify_checksums = true;
  /// Worker threads reading tensor records; 0: io_defaults().threads.
  int threads = 0;
  /// Where tensors are materialized: CPU (default) or a device, reached
  /// through the staging pool (pinned) with one host -> device copy per chunk
  /// straight into the destination.
  c10::Device device = c10::Device(c10::kCPU);
};

/// Where read_object spent its time.
struct ReadStats {
  /// Bytes of tensor records read.
  std::uint64_t tensor_bytes = 0;
  double unpickle_seconds = 0;  // data.pkl through the restricted unpickler
  double read_seconds = 0;      // pread + CRC-32 of the records
  double build_seconds = 0;     // the Value tree and shard specs
  /// Where read_seconds went: "threads", and seconds summed over the reading
  /// threads in "pread", "crc32", "h2d_copy" (device destinations) and
  /// "slot_wait" (waiting for a free staging slot).
  std::map<std::string, double> profile;
};

/// Reads smp checkpoint files and files written by torch.save (zip format).
/// Never executes code from the file: data.pkl goes through a restricted
/// unpickler that refuses anything but plain data, tensors and storages.
/// All methods are safe to call from several threads at once.
class Reader {
 public:
  /// Opens and validates the ZIP structure. Throws CheckpointError when the
  /// file is missing or is not a checkpoint, CorruptCheckpointError when it
  /// is truncated or damaged.
  explicit Reader(const std::string& path);
  ~Reader();
  Reader(Reader&&) noexcept;
  Reader& operator=(Reader&&) noexcept;

  const std::string& path() const;
  /// True for files written by smp (they carry smp/index.json); false for
  /// plain torch.save files.
  bool has_index() const;
  /// The tensor index: smp's record, or for torch.save files one derived
  /// from data.pkl by the restricted unpickler (no tensor data is read).
  const Index& index() const;
  /// The whole object, tensors materialized on the CPU; shard specs from the
  /// index are attached to the tensor leaves.
  /// `stats`, when given, receives the time of each phase.
  Value read_object(const ReadOptions& options = {}, ReadStats* stats = nullptr) const;
  /// Reads `length` bytes starting `offset` bytes into a contiguous tensor's
  /// data into `dst`, touching nothing else of the file. No checksum is
  /// verified (a range is not a whole record).
  void read_tensor_bytes(const TensorEntry& entry, std::uint64_t offset, std::uint64_t length,
                         void* dst) const;
  /// One tensor (CPU, its saved shape), its record's CRC-32 verified unless
  /// disabled.
  at::Tensor read_tensor(const TensorEntry& entry, const ReadOptions& options = {}) const;
  /// Checks the CRC-32 of every record of the archive (tensor data, data.pkl,
  /// the index, ...) through one bounded buffer, never holding a whole record.
  /// Returns one message per damaged record, naming the file, the record and
  /// (for tensor data) the tensor, with the stored and computed CRC-32; empty
  /// when all match. `on_bytes`, when given, is called with the bytes checked
  /// so far (progress).
  std::vector<std::string> verify_records(
      const std::function<void(std::uint64_t done, std::uint64_t total)>& on_bytes = {}) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ckpt
}  // namespace smp
