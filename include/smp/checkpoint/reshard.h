#pragma once
/// Resharding a partial checkpoint: loading, on any layout, the state a
/// checkpoint saved on another layout holds for this rank.
///
///   smp::ckpt::ReshardSource src("/ckpt/model");    // manifest + every part's index
///   smp::ckpt::TargetRank me = ...;                   // names + this layout's shard specs
///   std::vector<void*> dst = ...;                     // one contiguous buffer per tensor
///   src.load(me, dst);                                // plan + pread of the needed ranges
///
/// Opening reads the manifest and each part's index (no tensor data). load()
/// plans with plan_load (planner.h) and reads only the byte ranges the plan
/// names, through a bounded buffer per worker thread: peak memory is the
/// target tensors plus threads * ReshardOptions::buffer_bytes. load_group()
/// splits the bytes several ranks need among them (each read once per group,
/// then broadcast by the caller; docs/design.md, "Cooperative reads"). Tensors are
/// found by their full name, recorded at save time in each file's index
/// (info key kTensorNamesInfoKey; docs/file_format.md, "Shard records").

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/planner.h"

namespace smp {
namespace ckpt {

/// Index info key holding the full names of a file's tensors (JSON text).
constexpr const char* kTensorNamesInfoKey = "smp.tensor_names";

/// The full, layout-independent name of the tensor leaf at `path`.
struct NamedPath {
  std::vector<std::string> path;
  std::string name;
};

/// JSON text of the info entry: {"version": 1, "tensors": [{"path": [...], "name": "..."}]}.
std::string encode_tensor_names(const std::vector<NamedPath>& names);
/// Parses it; CorruptCheckpointError naming `file` when malformed.
std::vector<NamedPath> decode_tensor_names(const std::string& text, const std::string& file);

struct ReshardOptions {
  /// Worker threads issuing reads.
  int threads = 4;
  /// Bytes of the per-thread staging buffer: consecutive runs of one read op
  /// whose source span fits are read with one pread and scattered.
  std::uint64_t buffer_bytes = 8u << 20;
  /// Target tensors no file holds are skipped (RankPlan::missing) instead of raising.
  bool allow_missing = false;
};

struct ReshardStats {
  std::uint64_t bytes = 0;       ///< tensor bytes copied into the targets
  std::uint64_t read_bytes = 0;  ///< bytes read from the files (>= bytes with staging)
  std::uint64_t reads = 0;       ///< pread calls
  std::size_t parts_read = 0;    ///< files at least one byte was read from
  double plan_seconds = 0;
  double read_seconds = 0;
  std::vector<std::string> missing;  ///< allow_missing: names no file holds
};

/// A saved partial checkpoint opened for resharding.
class ReshardSource {
 public:
  /// `f`: the name given to smp.save (its manifest is `<f>.smp_manifest.json`,
  /// or that of f with ".pt" added or removed). Throws CheckpointError when
  /// there is no manifest, a part file is missing, or a part carries no
  /// tensor names (saved before shard records existed: load it on the saving
  /// layout).
  explicit ReshardSource(const std::string& f);
  ~ReshardSource();
  ReshardSource(ReshardSource&&) noexcept;
  ReshardSource& operator=(ReshardSource&&) noexcept;

  const Manifest& manifest() const;
  const std::string& manifest_path() const;
  /// Every part, its named tensors with their shard specs (tensor leaves
  /// without a name are not listed).
  const SavedCheckpoint& saved() const;
  /// Full path of part `part`.
  const std::string& part_path(std::size_t part) const;
  /// The index entry of saved().parts[part].tensors[tensor].
  const TensorEntry& entry(std::size_t part, std::size_t tensor) const;
  /// Parts holding `name` (ascending); empty when none does.
  std::vector<std::size_t> parts_holding(const std::string& name) const;
  /// The first saved copy of `name`; nullptr when no part holds it.
  const SavedTensor* find(const std::string& name) const;

  /// Plans `target` and fills dst[i] (target.tensors[i], contiguous,
  /// spec.local_shape() elements of its dtype) from the files. A target
  /// tensor with an empty dtype takes the saved one. Throws CheckpointError
  /// (from the planner) naming a missing tensor, range and file.
  ReshardStats load(const TargetRank& target, const std::vector<void*>& dst,
                    const ReshardOptions& options = {}) const;

  /// Cooperative load: `members` are the target ranks of a group that loads
  /// together (every member passes the same list), `me` this rank's index in
  /// it. Plans with plan_group and reads only this member's share: its own
  /// tensors and the shared chunks it is the reader of. The caller then
  /// broadcasts every chunk of `*chunks` from its reader within the group, in
  /// order (`(*chunk_tensor)[c]`: index of chunk c's tensor in dst), to
  /// complete the shared tensors. Empty dtypes take the saved ones.
  ReshardStats load_group(const std::vector<TargetRank>& members, std::size_t me,
                          const std::vector<void*>& dst, const ReshardOptions& options,
                          std::vector<SharedChunk>* chunks,
                          std::vector<std::size_t>* chunk_tensor) const;

 private:
  ReshardStats read(const RankPlan& plan, const std::vector<void*>& dst,
                    const ReshardOptions& options, double plan_seconds) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ckpt
}  // namespace smp
