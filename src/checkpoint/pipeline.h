#pragma once
/// Pipelined record writes (internal): the bytes of many tensors written at
/// offsets planned up front, in kIoChunk chunks, by parallel pwrite threads
/// that CRC-32 each chunk as they write it (no second pass). CPU tensors are
/// written straight from their memory; device tensors are copied chunk by
/// chunk into the bounded host staging pool (pinned) by the calling thread
/// while the writers write the chunks already copied, so host memory stays
/// within the pool whatever the state's size.

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/io.h"

namespace smp {
namespace ckpt {
namespace internal {

/// One record: `tensor`'s contiguous bytes (nbytes) go to file offset `offset`.
struct RecordWrite {
  at::Tensor tensor;
  std::uint64_t nbytes = 0;
  std::uint64_t offset = 0;
};

struct PipelineStats {
  double copy_seconds = 0;  ///< device -> host copies (overlapped with the writes)
  bool o_direct = false;    ///< tensor data went through an O_DIRECT descriptor
  /// Where the time went (keys of WriteStats::profile): writer threads'
  /// summed "pwrite", "crc32", "writeback", "idle"; the caller's "d2h_copy",
  /// "slot_wait"; "threads".
  std::map<std::string, double> profile;
};

/// Writes every record into `file` and returns the CRC-32 of each. With
/// `early_writeback`, each buffered chunk's write-out to the disk is started
/// as soon as it is written (File::start_writeback), so the disk works while
/// later chunks are written and the final fsync has little left to do. `o_direct`:
/// page-aligned chunks go through a second, O_DIRECT descriptor of the same
/// file when the file system accepts one (silently buffered otherwise).
/// Throws the first failure (CheckpointError naming the file and the call).
/// `stage_host`: CPU tensors go through the pool too (tests).
std::vector<std::uint32_t> write_records(const File& file, const std::vector<RecordWrite>& records,
                                         int threads, std::size_t pool_bytes, bool o_direct,
                                         PipelineStats* stats = nullptr, bool stage_host = false,
                                         bool early_writeback = true);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
