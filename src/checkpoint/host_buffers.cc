// Host buffers: page-aligned (pinned when CUDA is available) host memory for
// checkpoint I/O, allocated once and reused, and the machine-derived I/O defaults.
#include "checkpoint/host_buffers.h"

#include <sys/mman.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "checkpoint/io.h"
#include "smp/checkpoint/format.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {

namespace {

long env_long(const char* name, long fallback, long lo, long hi, const char* what) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  SMP_CHECK(end != env && *end == '\0' && v >= lo && v <= hi, ConfigError, name, " is '", env,
            "'; set it to ", what, " between ", lo, " and ", hi, " (or unset it for the default, ",
            fallback, ")");
  return v;
}

bool env_bool(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  const std::string v = env;
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  SMP_THROW(ConfigError, name, " is '", env, "'; set it to 1 or 0 (or unset it for the default, ",
            fallback ? 1 : 0, ")");
}

}  // namespace

IoDefaults io_defaults() {
  IoDefaults d;
  const long cores = std::max(1u, std::thread::hardware_concurrency());
  // Disks want several requests in flight even on few cores; more than 8
  // writers rarely helps one file.
  d.threads = static_cast<int>(
      env_long("SMP_CKPT_THREADS", std::min(8L, std::max(4L, cores / 2)), 1, 256,
               "a number of I/O threads"));
  const long def_mb = static_cast<long>(2 * d.threads * (internal::kIoChunk >> 20));
  d.pool_bytes = static_cast<std::size_t>(
                     env_long("SMP_CKPT_POOL_MB", def_mb, internal::kIoChunk >> 20, 1L << 20,
                              "a size in MiB of the host staging pool")) << 20;
  d.o_direct = env_bool("SMP_CKPT_O_DIRECT", false);
  d.early_writeback = env_bool("SMP_CKPT_WRITEBACK", true);
  return d;
}

namespace internal {

void advise_huge_pages(void* data, std::size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<std::uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

bool cuda_available() {
  static const bool has = [] {
    try {
      return at::globalContext().hasCUDA();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return has;
}

at::Tensor allocate_host(std::size_t bytes) {
  const std::int64_t n = static_cast<std::int64_t>(std::max<std::size_t>(bytes, 1));
  if (cuda_available()) {
    // cudaHostAlloc memory is page-aligned.
    return at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  // Plain memory, aligned to a page by hand (O_DIRECT needs it).
  const std::size_t total = static_cast<std::size_t>(n) + kPage;
  void* raw = std::aligned_alloc(kPage, (total + kPage - 1) / kPage * kPage);
  SMP_CHECK(raw != nullptr, CheckpointError, "could not allocate ", bytes,
            " bytes of host memory for checkpoint I/O; lower SMP_CKPT_POOL_MB");
  return at::from_blob(raw, {n}, [](void* p) { std::free(p); },
                       at::TensorOptions().dtype(at::kByte));
}

SlotPool::SlotPool(std::size_t slots, std::size_t slot_bytes)
    : slots_(std::max<std::size_t>(slots, 1)), slot_bytes_(slot_bytes) {
  slots = slots_;
  memory_ = allocate_host(slots * slot_bytes);
  free_.reserve(slots);
  for (std::size_t i = slots; i-- > 0;) free_.push_back(i);
}

std::size_t SlotPool::acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !free_.empty(); });
  const std::size_t s = free_.back();
  free_.pop_back();
  return s;
}

void SlotPool::release(std::size_t slot) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(slot);
  }
  cv_.notify_one();
}

char* SlotPool::data(std::size_t slot) const {
  return static_cast<char*>(memory_.data_ptr()) + slot * slot_bytes_;
}

at::Tensor SlotPool::tensor(std::size_t slot, std::size_t bytes) const {
  return memory_.narrow(0, static_cast<std::int64_t>(slot * slot_bytes_),
                        static_cast<std::int64_t>(bytes));
}

SlotPool& staging_pool(std::size_t pool_bytes, std::unique_lock<std::mutex>* lock) {
  static std::mutex mu;
  // Never destroyed: pinned memory must not be freed after CUDA shut down at exit.
  static SlotPool* pool = nullptr;
  *lock = std::unique_lock<std::mutex>(mu);
  const std::size_t slots = std::max<std::size_t>(pool_bytes / kIoChunk, 2);
  if (pool == nullptr || pool->slots() != slots) {
    delete pool;
    pool = nullptr;
    pool = new SlotPool(slots, kIoChunk);
  }
  return *pool;
}

at::Tensor snapshot_arena(std::size_t bytes) {
  static std::mutex mu;
  static at::Tensor* arena = new at::Tensor();  // never destroyed (see staging_pool)
  std::lock_guard<std::mutex> lock(mu);
  if (!arena->defined() || static_cast<std::size_t>(arena->numel()) < bytes) {
    *arena = at::Tensor();
    *arena = allocate_host(bytes);
  }
  return *arena;
}

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
