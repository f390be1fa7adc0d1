#pragma once
/// Host buffers (internal): page-aligned host memory for checkpoint I/O,
/// pinned when CUDA is available (plain memory otherwise), allocated once per
/// process and reused: the staging slots of the pipelined save and load, and
/// the snapshot arena of an asynchronous save. Also the machine-derived I/O
/// defaults (smp::ckpt::io_defaults, declared in smp/checkpoint/format.h).

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace smp {
namespace ckpt {
namespace internal {

/// Page size that O_DIRECT buffers, offsets and lengths are aligned to.
constexpr std::size_t kPage = 4096;

/// True when CUDA is usable in this process (pinned memory, device copies).
bool cuda_available();

/// `bytes` of page-aligned host memory (pinned when CUDA is available) as a
/// uint8 CPU tensor.
at::Tensor allocate_host(std::size_t bytes);

/// Asks the kernel to back [data, data + bytes) with transparent huge pages
/// (madvise MADV_HUGEPAGE on the whole 2 MiB pages inside it): a loaded
/// tensor's fresh memory then takes one page fault per 2 MiB instead of one
/// per 4 KiB. Best effort: a no-op where THP is off or unsupported.
void advise_huge_pages(void* data, std::size_t bytes);

/// A bounded pool of equal slots of host memory. acquire() blocks while every
/// slot is in use; release() hands one back. The memory of the process-wide
/// pool (staging_pool) is allocated on first use and kept.
class SlotPool {
 public:
  SlotPool(std::size_t slots, std::size_t slot_bytes);
  std::size_t slots() const { return slots_; }
  std::size_t slot_bytes() const { return slot_bytes_; }
  /// Index of a free slot (waits for one).
  std::size_t acquire();
  void release(std::size_t slot);
  char* data(std::size_t slot) const;
  /// The slot as a uint8 tensor (for device copies).
  at::Tensor tensor(std::size_t slot, std::size_t bytes) const;

 private:
  std::size_t slots_;
  std::size_t slot_bytes_;
  at::Tensor memory_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::size_t> free_;
};

/// The process-wide staging pool of `pool_bytes` in slots of kIoChunk bytes,
/// reallocated only when a different size is asked for. Callers hold the
/// returned lock while they use it (one pipelined save or load at a time).
SlotPool& staging_pool(std::size_t pool_bytes, std::unique_lock<std::mutex>* lock);

/// The process-wide snapshot arena of asynchronous saves: grows to `bytes`
/// (never shrinks) and is reused by the next snapshot.
at::Tensor snapshot_arena(std::size_t bytes);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
