#include "smp/model/grad_reducer.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "smp/config.h"
#include "smp/core/error.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

#if SMP_USE_NCCL
#include <c10/core/Event.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace smp {
namespace {

struct Bucket {
  bool distributed = false;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  /// Indices into Impl::params, in reverse registration order.
  std::vector<std::size_t> members;
  std::int64_t numel = 0;
  /// Members not marked ready in this pass.
  std::size_t pending = 0;
#if SMP_USE_NCCL
  /// CUDA buckets: recorded on the producing stream when a member is marked
  /// ready; the side stream waits for them before reading the gradients.
  std::vector<c10::Event> ready_events;
  /// Recorded on the side stream after the bucket's gradients are written back.
  std::optional<c10::Event> done_event;
#endif
};

std::string bucket_name(const Bucket& b) {
  return detail::str(b.distributed ? "RDP_GROUP" : "DP_GROUP", " bucket (", b.dtype, ", ",
                     b.device, ", ", b.members.size(), " parameters)");
}

}  // namespace

struct GradReducer::Impl {
  Options options;
  std::vector<ParamInfo> params;
  /// Bucket of each parameter; -1 for parameters without requires_grad.
  std::vector<long> bucket_of;
  std::vector<Bucket> buckets;
  std::vector<char> ready;
  double replicated_divisor = 1;
  double distributed_divisor = 1;

  std::mutex mu;
  std::condition_variable cv;
  /// Buckets [0, next_launch) have been queued in this pass.
  std::size_t next_launch = 0;
  /// Buckets the worker has finished in this pass.
  std::size_t completed = 0;
  std::deque<std::size_t> queue;
  /// First failure of this pass (rethrown by finish()).
  std::exception_ptr error;
  /// Set once a reduction failed: the communicators may be out of step, so the
  /// reducer refuses further work.
  std::string broken;
  bool stop = false;
  std::thread worker;

#if SMP_USE_NCCL
  std::map<int, c10::cuda::CUDAStream> side_streams;
  c10::cuda::CUDAStream side_stream(int device) {
    auto it = side_streams.find(device);
    if (it == side_streams.end())
      it = side_streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
    return it->second;
  }
#endif

  void check_usable(const char* op) const {
    SMP_CHECK(broken.empty(), StateError, "GradReducer.", op, " on rank ", smp::rank(),
              ": an earlier gradient reduction failed (", broken,
              "); the group's communicators may be out of step, restart the job");
  }

  /// Queues every complete bucket whose predecessors are queued. Needs mu.
  /// Counts parameter `index` (in a bucket, not ready yet) as ready; on CUDA,
  /// its bucket waits for the current stream's work so far. Caller holds mu.
  void mark(std::size_t index) {
    ready[index] = 1;
    Bucket& bucket = buckets[static_cast<std::size_t>(bucket_of[index])];
#if SMP_USE_NCCL
    if (bucket.device.is_cuda()) {
      c10::Event e(c10::DeviceType::CUDA);
      e.record(c10::cuda::getCurrentCUDAStream(bucket.device.index()));
      bucket.ready_events.push_back(std::move(e));
    }
#endif
    --bucket.pending;
  }

  void launch_ready_buckets() {
    bool queued = false;
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      queue.push_back(next_launch++);
      queued = true;
    }
    if (queued) cv.notify_all();
  }

  void run_worker() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stop || !queue.empty(); });
      if (queue.empty()) return;  // stop requested and nothing left
      const std::size_t b = queue.front();
      queue.pop_front();
      const bool skip = error != nullptr;
      lock.unlock();
      std::exception_ptr failure;
      if (!skip) {
        try {
          reduce(buckets[b]);
        } catch (...) {
          failure = std::current_exception();
        }
      }
      lock.lock();
      if (failure != nullptr && error == nullptr) error = failure;
      ++completed;
      cv.notify_all();
    }
  }

  /// Sums the bucket's gradients over its group, divides them and writes them
  /// back into each parameter's .grad (runs on the worker thread).
  void reduce(Bucket& bucket) {
    at::NoGradGuard no_grad;
#if SMP_USE_NCCL
    std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
    if (bucket.device.is_cuda()) {
      const auto stream = side_stream(bucket.device.index());
      stream_guard.emplace(stream);
      for (auto& e : bucket.ready_events) e.block(stream);
      bucket.ready_events.clear();
    }
#endif
    std::vector<at::Tensor> pieces;
    pieces.reserve(bucket.members.size());
    for (std::size_t i : bucket.members) {
      const at::Tensor& p = params[i].param;
      const at::Tensor g = p.grad();
      if (!g.defined()) {
        pieces.push_back(at::zeros({p.numel()}, p.options()));
        continue;
      }
      SMP_CHECK(!g.is_sparse(), NotSupportedError, "GradReducer: parameter '", params[i].name,
                "' has a sparse gradient on rank ", smp::rank(),
                "; sparse gradients are not supported (use a dense embedding: sparse=False)");
      pieces.push_back(g.reshape({-1}).to(bucket.dtype));
    }
    at::Tensor flat = at::cat(pieces);
    const CommGroup group = bucket.distributed ? CommGroup::kRdpGroup : CommGroup::kDpGroup;
    allreduce(flat, group, ReduceOp::kSum);
    flat.div_(bucket.distributed ? distributed_divisor : replicated_divisor);
    std::int64_t offset = 0;
    for (std::size_t i : bucket.members) {
      at::Tensor& p = params[i].param;
      const std::int64_t n = p.numel();
      at::Tensor part = flat.narrow(0, offset, n).view(p.sizes());
      offset += n;
      at::Tensor g = p.grad();
      if (g.defined()) {
        g.copy_(part);
      } else {
        // Only reached from finish(), while the caller waits: nothing else
        // touches the parameter's autograd state meanwhile.
        p.mutable_grad() = part.clone();
      }
    }
#if SMP_USE_NCCL
    if (bucket.device.is_cuda()) {
      bucket.done_event.emplace(c10::DeviceType::CUDA);
      bucket.done_event->record(side_stream(bucket.device.index()));
    }
#endif
  }

  void reset_pass() {
    std::fill(ready.begin(), ready.end(), 0);
    for (auto& b : buckets) b.pending = b.members.size();
    next_launch = 0;
    completed = 0;
    error = nullptr;
  }
};

GradReducer::GradReducer(std::vector<ParamInfo> params, Options options)
    : impl_(std::make_unique<Impl>()) {
  SMP_CHECK(is_initialized(), StateError,
            "GradReducer needs the smp runtime: call smp.init() (smp::init()) first");
  SMP_CHECK(options.bucket_bytes > 0, ConfigError, "GradReducer: bucket_bytes must be positive, got ",
            options.bucket_bytes);
  Impl& d = *impl_;
  d.options = options;
  d.params = std::move(params);
  d.replicated_divisor = dp_size();
  d.distributed_divisor = options.prescaled_batch ? rdp_size() : dp_size();
  d.bucket_of.assign(d.params.size(), -1);
  d.ready.assign(d.params.size(), 0);

  // Buckets fill in reverse registration order, one open bucket per (kind,
  // dtype, device); a bucket closes once it holds bucket_bytes.
  std::map<std::tuple<bool, int, std::string>, std::size_t> open;
  for (std::size_t k = d.params.size(); k-- > 0;) {
    const ParamInfo& info = d.params[k];
    SMP_CHECK(info.param.defined(), ConfigError, "GradReducer: parameter '", info.name,
              "' (index ", k, ") is an undefined tensor on rank ", rank());
    if (!info.param.requires_grad()) continue;
    SMP_CHECK(info.param.is_floating_point(), ConfigError, "GradReducer: parameter '", info.name,
              "' has dtype ", info.param.scalar_type(),
              "; gradients need a floating point parameter (rank ", rank(), ")");
    const auto key = std::make_tuple(info.distributed(), static_cast<int>(info.param.scalar_type()),
                                     info.param.device().str());
    auto it = open.find(key);
    if (it == open.end()) {
      Bucket b;
      b.distributed = info.distributed();
      b.dtype = info.param.scalar_type();
      b.device = info.param.device();
      d.buckets.push_back(std::move(b));
      it = open.emplace(key, d.buckets.size() - 1).first;
    }
    Bucket& bucket = d.buckets[it->second];
    bucket.members.push_back(k);
    bucket.numel += info.param.numel();
    d.bucket_of[k] = static_cast<long>(it->second);
    if (static_cast<std::size_t>(bucket.numel) * info.param.element_size() >= options.bucket_bytes)
      open.erase(it);
  }
  for (auto& b : d.buckets) {
#if !SMP_USE_NCCL
    SMP_CHECK(!b.device.is_cuda(), NotSupportedError, "GradReducer: ", bucket_name(b),
              " holds CUDA parameters but this smp build has no NCCL; rebuild with "
              "SMP_USE_NCCL=ON or keep the model on the CPU");
#endif
    b.pending = b.members.size();
  }
  d.worker = std::thread([&d] { d.run_worker(); });
}

GradReducer::~GradReducer() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  if (impl_->worker.joinable()) impl_->worker.join();
}

void GradReducer::mark_ready(std::size_t index) {
  Impl& d = *impl_;
  std::lock_guard<std::mutex> lock(d.mu);
  d.check_usable("mark_ready");
  SMP_CHECK(index < d.params.size(), ConfigError, "GradReducer.mark_ready: index ", index,
            " is out of range; the reducer has ", d.params.size(), " parameters (rank ", rank(),
            ")");
  const long b = d.bucket_of[index];
  if (b < 0) return;
  SMP_CHECK(!d.ready[index], StateError, "GradReducer: the gradient of parameter '",
            d.params[index].name, "' was produced twice in one pass on rank ", rank(),
            "; finish the pass (DistributedModel.backward(loss) or DistributedOptimizer.step()) "
            "before the next backward, or accumulate with backward_passes_per_step");
  d.mark(index);
  d.launch_ready_buckets();
}

void GradReducer::finish() {
  Impl& d = *impl_;
  std::unique_lock<std::mutex> lock(d.mu);
  d.check_usable("finish");
  for (std::size_t k = 0; k < d.params.size(); ++k) {
    if (d.bucket_of[k] < 0 || d.ready[k]) continue;
    d.mark(k);
  }
  d.launch_ready_buckets();
  d.cv.wait(lock, [&] { return d.completed == d.buckets.size(); });
  std::exception_ptr error = d.error;
#if SMP_USE_NCCL
  for (auto& b : d.buckets) {
    if (b.done_event) {
      b.done_event->block(c10::cuda::getCurrentCUDAStream(b.device.index()));
      b.done_event.reset();
    }
  }
#endif
  d.reset_pass();
  if (error != nullptr) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      d.broken = e.what();
    } catch (...) {
      d.broken = "unknown error";
    }
    std::rethrow_exception(error);
  }
}

std::size_t GradReducer::num_buckets() const { return impl_->buckets.size(); }

}  // namespace smp
