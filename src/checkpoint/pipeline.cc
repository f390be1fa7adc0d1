// Pipeline: parallel chunked pwrite + CRC-32 of tensor records, device tensors
// staged through the bounded host pool while earlier chunks are being written.
#include "checkpoint/pipeline.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "checkpoint/host_buffers.h"
#include "checkpoint/value_util.h"

namespace smp {
namespace ckpt {
namespace internal {

namespace {

struct Chunk {
  std::size_t record = 0;
  std::uint64_t begin = 0;
  std::size_t length = 0;
  const char* data = nullptr;  // host bytes to write (a pool slot for staged chunks)
  std::size_t slot = SIZE_MAX;  // pool slot to hand back, or SIZE_MAX
  std::size_t index = 0;        // position in the per-chunk CRC table
};

/// Writes [data, data+n) at `offset`: the page-aligned part through `direct`
/// (when open and `data`/`offset` are aligned), the rest through `file`.
/// Returns whether any of it went through the page cache.
bool write_chunk(const File& file, const File& direct, const char* data, std::size_t n,
                 std::uint64_t offset) {
  if (direct.is_open() && reinterpret_cast<std::uintptr_t>(data) % kPage == 0 &&
      offset % kPage == 0) {
    const std::size_t aligned = n / kPage * kPage;
    if (aligned > 0) direct.pwrite_all(data, aligned, offset);
    if (aligned < n) file.pwrite_all(data + aligned, n - aligned, offset + aligned);
    return aligned < n;
  }
  file.pwrite_all(data, n, offset);
  return true;
}

using Clock = std::chrono::steady_clock;

/// Thread-nanoseconds, summed by several threads.
struct Tally {
  std::atomic<std::int64_t> ns{0};
  void add(Clock::time_point& since) {
    const auto now = Clock::now();
    ns += std::chrono::duration_cast<std::chrono::nanoseconds>(now - since).count();
    since = now;
  }
  double seconds() const { return ns.load() * 1e-9; }
};

}  // namespace

std::vector<std::uint32_t> write_records(const File& file, const std::vector<RecordWrite>& records,
                                         int threads, std::size_t pool_bytes, bool o_direct,
                                         PipelineStats* stats, bool stage_host,
                                         bool early_writeback) {
  // Sources: host bytes written in place, or device bytes staged chunk by chunk.
  std::vector<at::Tensor> host(records.size()), device(records.size());
  std::vector<Chunk> direct_chunks, staged_chunks;
  std::size_t n_chunks = 0;
  for (std::size_t i = 0; i < records.size(); ++i) {
    const RecordWrite& r = records[i];
    if (r.nbytes == 0) continue;
    const bool on_host = r.tensor.device().is_cpu() && !stage_host;
    if (on_host) {
      host[i] = host_bytes(r.tensor);  // a view for contiguous CPU tensors
    } else {
      at::Tensor d = r.tensor.detach().resolve_conj().resolve_neg().contiguous();
      device[i] = d.reshape({-1}).view(at::kByte);
    }
    for (std::uint64_t off = 0; off < r.nbytes; off += kIoChunk) {
      Chunk c;
      c.record = i;
      c.begin = off;
      c.length = static_cast<std::size_t>(std::min<std::uint64_t>(kIoChunk, r.nbytes - off));
      c.index = n_chunks++;
      if (on_host) {
        c.data = static_cast<const char*>(host[i].data_ptr()) + off;
        direct_chunks.push_back(c);
      } else {
        staged_chunks.push_back(c);
      }
    }
  }

  File direct;
  if (o_direct) direct = File::open_direct(file.path());
  if (stats != nullptr) stats->o_direct = direct.is_open();

  std::vector<std::uint32_t> chunk_crc(n_chunks, 0);
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Chunk> ready(direct_chunks.begin(), direct_chunks.end());
  bool producer_done = staged_chunks.empty();
  std::exception_ptr error;
  std::atomic<bool> failed{false};

  std::unique_lock<std::mutex> pool_lock;
  SlotPool* pool = staged_chunks.empty() ? nullptr : &staging_pool(pool_bytes, &pool_lock);

  Tally t_pwrite, t_crc, t_writeback, t_idle, t_slot_wait;
  auto worker = [&] {
    auto t = Clock::now();
    while (true) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return !ready.empty() || producer_done; });
        if (ready.empty()) break;
        c = ready.front();
        ready.pop_front();
      }
      t_idle.add(t);
      if (!failed.load()) {
        try {
          const std::uint64_t at = records[c.record].offset + c.begin;
          const bool buffered = write_chunk(file, direct, c.data, c.length, at);
          t_pwrite.add(t);
          if (buffered && early_writeback) {
            file.start_writeback(at, c.length);
            t_writeback.add(t);
          }
          chunk_crc[c.index] = crc32_update(0, c.data, c.length);
          t_crc.add(t);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
      // Always hand the slot back: the producer may be waiting for it.
      if (c.slot != SIZE_MAX) pool->release(c.slot);
      t = Clock::now();
    }
    t_idle.add(t);
  };
  const int workers = static_cast<int>(std::max<std::size_t>(
      1, std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)), n_chunks)));
  std::vector<std::thread> pool_threads;
  pool_threads.reserve(static_cast<std::size_t>(workers));
  for (int t = 0; t < workers; ++t) pool_threads.emplace_back(worker);

  // The producer: device -> host copies into free slots, in file order.
  const auto t0 = std::chrono::steady_clock::now();
  try {
    for (Chunk c : staged_chunks) {
      if (failed.load()) break;
      auto tw = Clock::now();
      c.slot = pool->acquire();
      t_slot_wait.add(tw);
      try {
        at::Tensor dst = pool->tensor(c.slot, c.length);
        dst.copy_(device[c.record].narrow(0, static_cast<std::int64_t>(c.begin),
                                          static_cast<std::int64_t>(c.length)));
      } catch (...) {
        pool->release(c.slot);
        throw;
      }
      c.data = pool->data(c.slot);
      {
        std::lock_guard<std::mutex> lock(mu);
        ready.push_back(c);
      }
      cv.notify_one();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu);
    if (!error) error = std::current_exception();
    failed = true;
  }
  if (stats != nullptr) stats->copy_seconds = seconds_since(t0) - t_slot_wait.seconds();
  {
    std::lock_guard<std::mutex> lock(mu);
    producer_done = true;
  }
  cv.notify_all();
  for (auto& t : pool_threads) t.join();
  if (error) std::rethrow_exception(error);
  if (stats != nullptr) {
    stats->profile["threads"] = workers;
    stats->profile["pwrite"] = t_pwrite.seconds();
    stats->profile["crc32"] = t_crc.seconds();
    stats->profile["writeback"] = t_writeback.seconds();
    stats->profile["idle"] = t_idle.seconds();
    if (!staged_chunks.empty()) {
      stats->profile["d2h_copy"] = stats->copy_seconds;
      stats->profile["slot_wait"] = t_slot_wait.seconds();
    }
  }

  // Per-record CRCs from the per-chunk ones (chunks of a record are consecutive).
  std::vector<std::uint32_t> crc(records.size(), 0);
  auto fold = [&](const std::vector<Chunk>& chunks) {
    for (const Chunk& c : chunks) {
      crc[c.record] = c.begin == 0 ? chunk_crc[c.index]
                                   : crc32_join(crc[c.record], chunk_crc[c.index], c.length);
    }
  };
  fold(direct_chunks);
  fold(staged_chunks);
  return crc;
}

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
