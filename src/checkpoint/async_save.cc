// Async save: snapshots a state into the pinned snapshot arena, writes and
// commits it in a background thread, and makes the next save, load,
// shutdown and process exit wait for it (errors surface there, once).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>

#include "checkpoint/commit.h"
#include "checkpoint/host_buffers.h"
#include "checkpoint/io.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"
#include "smp/core/logging.h"
#include "smp/runtime.h"

namespace smp {
namespace ckpt {

struct AsyncSave::State {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  bool error_reported = false;
  std::string error;  // empty: success
  SaveStats stats;
  double snapshot_seconds = 0;
  std::uint64_t snapshot_bytes = 0;
  std::string what;  // "'<f>' (rank r)" for messages

  void wait_finished() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return finished; });
  }
  /// Throws the error once; later calls return quietly.
  void throw_if_failed() {
    std::string e;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty() || error_reported) return;
      error_reported = true;
      e = error;
    }
    SMP_THROW(CheckpointError, e);
  }
};

namespace {

using Clock = std::chrono::steady_clock;

std::mutex g_pending_mutex;
std::shared_ptr<AsyncSave::State> g_pending;

int my_rank() { return is_initialized() ? rank() : 0; }

/// Process exit waits for the save in flight (registered at the first
/// async_save, so it runs before the runtime's static state is destroyed).
void wait_at_exit() {
  try {
    wait_for_pending_saves();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "smp: %s\n", e.what());
  }
}

/// Copies every tensor leaf of `v` into the snapshot arena and points the
/// leaf at its copy. Identity is kept: the same tensor object twice is one
/// copy (one tensor object), distinct tensors viewing the same bytes share
/// one copy's memory (one storage record), as pickle_object expects.
class Snapshot {
 public:
  std::uint64_t run(Value& root) {
    collect(root);
    // Layout in the arena: each distinct view page-aligned.
    std::size_t total = 0;
    for (auto& view : views_) {
      view.offset = total;
      total += (view.nbytes + internal::kPage - 1) / internal::kPage * internal::kPage;
    }
    at::Tensor arena = internal::snapshot_arena(total);
    char* base = static_cast<char*>(arena.data_ptr());
    std::uint64_t bytes = 0;
    for (auto& view : views_) {
      const at::Tensor& src = view.source;
      if (view.nbytes == 0) {
        view.copy = at::empty(src.sizes(), at::TensorOptions().dtype(src.scalar_type()));
      } else {
        // A leaf over the arena; the deleter keeps the arena alive.
        view.copy = at::from_blob(base + view.offset, src.sizes(), [arena](void*) {},
                                  at::TensorOptions().dtype(src.scalar_type()));
        // Synchronous: the bytes are in host memory when async_save returns.
        view.copy.copy_(src.detach());
      }
      bytes += view.nbytes;
    }
    for (auto& leaf : leaves_) {
      View& view = views_[leaf.view];
      at::Tensor t;
      if (!view.used) {
        t = view.copy;
        view.used = true;
      } else {
        t = view.copy.detach();  // another tensor object over the same bytes
      }
      auto known = by_impl_.find(leaf.impl);
      if (known != by_impl_.end() && known->second.defined()) {
        t = known->second;
      } else {
        if (leaf.requires_grad) t.set_requires_grad(true);
        by_impl_[leaf.impl] = t;
      }
      *leaf.value = Value::tensor(t, leaf.value->shard());
    }
    return bytes;
  }

 private:
  struct View {
    at::Tensor source;
    std::uint64_t nbytes = 0;
    std::size_t offset = 0;
    at::Tensor copy;
    bool used = false;
  };
  struct Leaf {
    Value* value;
    const void* impl;
    std::size_t view;
    bool requires_grad;
  };
  using ViewKey = std::tuple<const void*, std::int64_t, std::vector<std::int64_t>,
                             std::vector<std::int64_t>, int, std::string>;

  void collect(Value& v) {
    switch (v.kind()) {
      case Value::Kind::kTensor: {
        const at::Tensor& t = v.tensor();
        ViewKey key{t.storage().unsafeGetStorageImpl(), t.storage_offset(), t.sizes().vec(),
                    t.strides().vec(), static_cast<int>(t.scalar_type()), t.device().str()};
        auto it = view_index_.find(key);
        std::size_t index;
        if (it == view_index_.end()) {
          index = views_.size();
          View view;
          view.source = t;
          view.nbytes = static_cast<std::uint64_t>(t.numel()) * t.element_size();
          views_.push_back(std::move(view));
          view_index_.emplace(std::move(key), index);
        } else {
          index = it->second;
        }
        leaves_.push_back({&v, t.unsafeGetTensorImpl(), index, t.requires_grad()});
        by_impl_.emplace(t.unsafeGetTensorImpl(), at::Tensor());
        break;
      }
      case Value::Kind::kList:
      case Value::Kind::kTuple:
        for (auto& x : v.items()) collect(x);
        break;
      case Value::Kind::kDict:
        for (auto& kv : v.pairs()) collect(kv.second);
        if (v.ordered() && !v.attributes().is_none()) {
          // Attributes (nn.Module's _metadata) rarely hold tensors: plain copies.
          Value attrs = v.attributes();
          copy_tensors(attrs);
          v.set_attributes(std::move(attrs));
        }
        break;
      default:
        break;
    }
  }

  static void copy_tensors(Value& v) {
    switch (v.kind()) {
      case Value::Kind::kTensor:
        v = Value::tensor(v.tensor().detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true),
                          v.shard());
        break;
      case Value::Kind::kList:
      case Value::Kind::kTuple:
        for (auto& x : v.items()) copy_tensors(x);
        break;
      case Value::Kind::kDict:
        for (auto& kv : v.pairs()) copy_tensors(kv.second);
        break;
      default:
        break;
    }
  }

  std::vector<View> views_;
  std::map<ViewKey, std::size_t> view_index_;
  std::vector<Leaf> leaves_;
  std::map<const void*, at::Tensor> by_impl_;
};

std::string describe_items(const std::vector<AsyncSaveItem>& items) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i].f + "'";
  return out;
}

}  // namespace

bool AsyncSave::done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->finished;
}

SaveStats AsyncSave::wait() {
  if (!state_) return {};
  state_->wait_finished();
  state_->throw_if_failed();
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->stats;
}

double AsyncSave::snapshot_seconds() const { return state_ ? state_->snapshot_seconds : 0; }
std::uint64_t AsyncSave::snapshot_bytes() const { return state_ ? state_->snapshot_bytes : 0; }

void wait_for_pending_saves() {
  std::shared_ptr<AsyncSave::State> pending;
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    pending = g_pending;
  }
  if (!pending) return;
  pending->wait_finished();
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    if (g_pending == pending) g_pending.reset();
  }
  pending->throw_if_failed();
}

bool save_in_flight() {
  std::lock_guard<std::mutex> lock(g_pending_mutex);
  if (!g_pending) return false;
  std::lock_guard<std::mutex> state_lock(g_pending->mu);
  return !g_pending->finished;
}

SaveStats save(const Value& object, const std::string& f, const SaveOptions& options) {
  wait_for_pending_saves();
  return internal::save_now(object, f, options);
}

AsyncSave async_save_all(std::vector<AsyncSaveItem> items, std::function<void()> then) {
  wait_for_pending_saves();
  static std::once_flag exit_hook;
  std::call_once(exit_hook, [] { std::atexit(wait_at_exit); });
  const auto t0 = Clock::now();
  auto state = std::make_shared<AsyncSave::State>();
  const int me = my_rank();
  state->what = detail::str(describe_items(items), " (rank ", me, ")");
  {
    // One arena for the whole job: snapshot every item's tensors together.
    Value all = Value::list();
    for (auto& item : items) all.append(std::move(item.object));
    Snapshot snap;
    state->snapshot_bytes = snap.run(all);
    for (std::size_t i = 0; i < items.size(); ++i) items[i].object = std::move(all.items()[i]);
  }
  state->snapshot_seconds = internal::seconds_since(t0);
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    g_pending = state;
  }
  std::thread([state, me, items = std::move(items), then = std::move(then)]() mutable {
    SaveStats last;
    std::string error;
    std::string current;
    try {
      for (auto& item : items) {
        current = item.f;
        last = internal::save_now(item.object, item.f, item.options);
        item.object = Value();  // release this item's snapshot views early
      }
      current.clear();
      if (then) then();
    } catch (const std::exception& e) {
      error = current.empty()
                  ? detail::str("asynchronous smp.save of ", state->what,
                                ": the step after the writes failed in the background: ", e.what())
                  : detail::str("asynchronous smp.save of '", current, "' failed in the background "
                                "on rank ", me, ": ", e.what());
    } catch (...) {
      error = detail::str("asynchronous smp.save of ", state->what,
                          " failed in the background with an unknown error");
    }
    items.clear();
    then = nullptr;
    if (!error.empty()) SMP_LOG(kError, error);
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->stats = last;
      state->error = error;
      state->finished = true;
    }
    state->cv.notify_all();
  }).detach();
  return AsyncSave(state);
}

AsyncSave async_save(const Value& object, const std::string& f, const SaveOptions& options) {
  std::vector<AsyncSaveItem> items;
  items.push_back({object, f, options});
  return async_save_all(std::move(items));
}

}  // namespace ckpt
}  // namespace smp
