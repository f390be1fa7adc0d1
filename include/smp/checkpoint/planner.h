#pragma once
/// The resharding planner: from the description of a saved partial checkpoint
/// (which tensors each part file holds, with their shard specs) and the
/// tensors a target rank needs (with the shard specs of the target layout), it
/// computes which byte ranges of which saved tensors land where in the target
/// rank's local tensors.
///
/// Pure and deterministic: no I/O, no torch, no communication. The same
/// inputs give the same plan on every rank, so ranks may plan for themselves
/// or for every rank. Tensors are matched by their full name (the caller maps
/// state-dict key paths, optimizer state by parameter name, to one string),
/// never by pipeline stage or position. The plan data model is specified in
/// docs/file_format.md, "Resharding plan".
///
/// Scope: a saved tensor is replicated or split along one dimension
/// (smp::ShardSpec); the target may use another split dimension, another
/// number of shards, or replicate it. Every needed region must be covered by
/// the shards of one saved split (its replicas may come from any files).

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "smp/core/shard_spec.h"

namespace smp {
namespace ckpt {

/// One tensor as stored in one part file: its bytes are one contiguous
/// row-major record of `spec.local_shape()` elements.
struct SavedTensor {
  /// Full name, identical across layouts ("model/layers.3.attn.weight",
  /// "optimizer/layers.3.attn.weight/exp_avg").
  std::string name;
  /// dtype name as the index writes it ("float32"); compared, never parsed.
  std::string dtype;
  std::size_t element_size = 0;
  /// The stored (local) shape; must equal spec.local_shape().
  std::vector<std::int64_t> shape;
  ShardSpec spec;
  /// Absolute file offset of the tensor's first byte (TensorEntry::offset +
  /// storage_offset * element_size) when known; the planner only carries it
  /// so that callers can turn ReadOp offsets into file offsets.
  std::uint64_t file_offset = 0;
};

/// One saved part file and its coordinates in the saving layout.
struct SavedPart {
  /// File name (relative to the checkpoint's manifest, or a path).
  std::string file;
  int pp_rank = 0;
  int tp_rank = 0;
  /// -1 when the file is shared by every rdp rank (saved without v3).
  int rdp_rank = -1;
  std::vector<SavedTensor> tensors;
};

/// The saved checkpoint: every part file of one save (a manifest's files).
struct SavedCheckpoint {
  /// The saving layout; used in error messages and to name a missing part.
  int pp_size = 1;
  int tp_size = 1;
  int rdp_size = 1;
  std::vector<SavedPart> parts;
};

/// One tensor a target rank needs, contiguous row-major, of
/// `spec.local_shape()` elements.
struct TargetTensor {
  std::string name;
  std::string dtype;
  std::size_t element_size = 0;
  ShardSpec spec;
};

/// One rank of the target layout and the tensors it needs.
struct TargetRank {
  int pp_rank = 0;
  int tp_rank = 0;
  int rdp_rank = 0;
  std::vector<TargetTensor> tensors;
};

/// One level of a strided copy: `count` repetitions, advancing the source by
/// `src_stride` and the destination by `dst_stride` bytes each time.
struct RunLoop {
  std::int64_t count = 1;
  std::int64_t src_stride = 0;
  std::int64_t dst_stride = 0;
  bool operator==(const RunLoop& o) const {
    return count == o.count && src_stride == o.src_stride && dst_stride == o.dst_stride;
  }
};

/// Copies one box of elements from one saved tensor into the target tensor:
/// runs of `run_bytes` contiguous bytes, at source byte offsets (within the
/// saved tensor's record) src_offset + sum(i_k * loops[k].src_stride) and
/// destination byte offsets (within the target local tensor) dst_offset +
/// sum(i_k * loops[k].dst_stride), for every 0 <= i_k < loops[k].count.
/// `loops` is outer first and empty when the box is one run. Splits along
/// dim 0 give one run; along dim d > 0 one loop (rows) of runs; two different
/// split dims at most two loops. Runs are ascending in both offsets.
struct ReadOp {
  /// Source: SavedCheckpoint::parts[part].tensors[tensor].
  std::size_t part = 0;
  std::size_t tensor = 0;
  std::uint64_t src_offset = 0;
  std::uint64_t dst_offset = 0;
  std::uint64_t run_bytes = 0;
  std::vector<RunLoop> loops;

  /// Number of runs (product of the loop counts).
  std::int64_t runs() const;
  /// Bytes copied: runs() * run_bytes.
  std::uint64_t bytes() const;
  /// [first, end) bytes of the source record the runs touch: reading this
  /// span with one call and scattering from it is the alternative to one
  /// read per run.
  std::uint64_t src_begin() const { return src_offset; }
  std::uint64_t src_end() const;
  bool operator==(const ReadOp& o) const;
};

/// Calls fn(src_offset, dst_offset, length) for every run of `op`, in order.
template <typename Fn>
void for_each_run(const ReadOp& op, Fn&& fn) {
  const std::size_t n = op.loops.size();
  if (op.run_bytes == 0) return;
  for (const RunLoop& l : op.loops) {
    if (l.count <= 0) return;
  }
  std::vector<std::int64_t> idx(n, 0);
  std::uint64_t src = op.src_offset, dst = op.dst_offset;
  while (true) {
    fn(src, dst, op.run_bytes);
    std::size_t k = n;
    while (k > 0) {
      --k;
      if (++idx[k] < op.loops[k].count) {
        src += op.loops[k].src_stride;
        dst += op.loops[k].dst_stride;
        break;
      }
      src -= (op.loops[k].count - 1) * op.loops[k].src_stride;
      dst -= (op.loops[k].count - 1) * op.loops[k].dst_stride;
      idx[k] = 0;
      if (k == 0) return;
    }
    if (n == 0) return;
  }
}

/// Copies `op` from the saved tensor's bytes (`src`: its whole record) into
/// the target tensor's bytes (`dst`). Memory only.
inline void execute(const ReadOp& op, const void* src, void* dst) {
  for_each_run(op, [&](std::uint64_t s, std::uint64_t d, std::uint64_t len) {
    std::memcpy(static_cast<char*>(dst) + d, static_cast<const char*>(src) + s, len);
  });
}

/// How one target tensor is assembled.
struct TensorPlan {
  std::string name;
  /// Bytes of the target local tensor; the reads cover each exactly once.
  std::uint64_t nbytes = 0;
  /// False when no saved file holds the tensor (only with
  /// PlanOptions::allow_missing; then `reads` is empty).
  bool found = true;
  std::vector<ReadOp> reads;
};

/// The plan of one target rank; tensors in the order of TargetRank::tensors.
struct RankPlan {
  int pp_rank = 0;
  int tp_rank = 0;
  int rdp_rank = 0;
  std::vector<TensorPlan> tensors;
  /// Names of target tensors no saved file holds (allow_missing only).
  std::vector<std::string> missing;

  /// Bytes this rank reads from each part (indexed like SavedCheckpoint::parts).
  std::vector<std::uint64_t> bytes_by_part(std::size_t num_parts) const;
};

/// The plans of every target rank, plus the saved names no target needs.
struct LoadPlan {
  std::vector<RankPlan> ranks;
  /// Saved tensor names that no target rank needs (sorted).
  std::vector<std::string> unused;
};

struct PlanOptions {
  /// Target tensors no saved file holds are reported in RankPlan::missing
  /// instead of raising (load_state_dict(strict=False)).
  bool allow_missing = false;
};

/// Plans one target rank. Throws CheckpointError when the saved checkpoint is
/// inconsistent (a stored shape that does not match its spec; copies of one
/// name with different global shapes or dtypes: names both files), when a
/// target tensor's global shape or dtype differs from the saved one (names
/// both), when a target tensor is in no file (unless allow_missing), or when
/// part of it is in no file (names the tensor, the element range and the
/// part that should have held it).
RankPlan plan_load(const SavedCheckpoint& saved, const TargetRank& target,
                   const PlanOptions& options = {});

/// Plans every target rank (same result as planning each one alone).
LoadPlan plan_load(const SavedCheckpoint& saved, const std::vector<TargetRank>& targets,
                   const PlanOptions& options = {});

/// Cooperative reading: one piece of a tensor that every member of a group
/// needs with the same shard spec and dtype (rdp replicas; tp ranks for a
/// replicated tensor): rows [row_begin, row_end) along dim 0 of the target
/// local tensor (a scalar has one row), i.e. its contiguous bytes
/// [byte_begin, byte_end). Member `reader` reads it from the files; the
/// others receive it from the reader (a broadcast within the group).
struct SharedChunk {
  std::string name;
  std::int64_t row_begin = 0;
  std::int64_t row_end = 0;
  std::uint64_t byte_begin = 0;
  std::uint64_t byte_end = 0;
  /// Index of the reading member in the group.
  int reader = 0;
};

/// The plan of a group of target ranks that load together.
struct GroupPlan {
  /// One plan per member, in member order. A member's TensorPlan of a shared
  /// tensor holds only the reads of the chunks it reads (its other bytes come
  /// by broadcast); a tensor only it needs is planned as plan_load does.
  std::vector<RankPlan> ranks;
  /// Every shared tensor's chunks: the shared tensors in the order of the
  /// first member's tensors, rows ascending. Every member broadcasts them in
  /// this order.
  std::vector<SharedChunk> chunks;
  /// chunk_tensor[m][c]: index of chunks[c]'s tensor in members[m].tensors.
  std::vector<std::vector<std::size_t>> chunk_tensor;
};

/// Plans a group of target ranks so that each byte range the members share is
/// read from disk once per group: the shared bytes (tensors every member needs
/// with the same name, spec and dtype, and some file holds) are cut into one
/// contiguous range per member, at row boundaries, in the order of the first
/// member's tensors, and each range is read by its member alone. Tensors not
/// shared are read by the member needing them. Every member computes the same
/// plan from the same `members`; with one member it equals plan_load.
GroupPlan plan_group(const SavedCheckpoint& saved, const std::vector<TargetRank>& members,
                     const PlanOptions& options = {});

}  // namespace ckpt
}  // namespace smp
