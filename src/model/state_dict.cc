// The state-dict rules of both DistributedModels (see smp/model/state_dict.h).

#include "smp/model/state_dict.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_set>

#include "checkpoint/commit.h"
#include "runtime_store.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"
#include "smp/runtime.h"

namespace smp::state_dict {
namespace {

/// ['a', 'b'], as Python prints a list of names.
std::string list_of(const std::vector<std::string>& names) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < names.size(); ++i) os << (i ? ", '" : "'") << names[i] << "'";
  os << "]";
  return os.str();
}

/// Fills result.unexpected and throws when strict and a key is off.
void check_keys(const std::unordered_set<std::string>& known, const TensorMap& state,
                bool strict, bool partial, const Api& api, LoadResult& result) {
  for (const auto& e : state) {
    if (e.key() == kPartialStateKey) continue;
    if (known.count(e.key()) == 0) result.unexpected.push_back(e.key());
  }
  if (strict && (!result.missing.empty() || !result.unexpected.empty()))
    SMP_THROW(ConfigError, api.load, " (", partial ? "partial" : "full", " state dict, rank ",
              rank(), "): missing keys ", list_of(result.missing), ", unexpected keys ",
              list_of(result.unexpected), "; load a state dict of the same model, or pass ",
              api.not_strict);
}

const at::Tensor& value_of(const TensorMap& state, const std::string& name, const Api& api) {
  const at::Tensor& value = state[name];
  SMP_CHECK(value.defined(), ConfigError, api.load, ": entry '", name, "' (rank ", rank(),
            ") is not a tensor; load a state dict of the same model");
  return value;
}

/// Before the collective gather of a full state dict, every TP_GROUP member
/// checks in through the job's store. A member missing after
/// SMP_CHECKPOINT_TIMEOUT (default 60 s) is named, with the rule that is
/// usually broken, instead of the gather hanging until SMP_COMM_TIMEOUT.
void check_in_for_gather() {
  std::vector<int> members = group_members(CommGroup::kTpGroup);
  if (members.size() <= 1) return;
  std::sort(members.begin(), members.end());
  std::string group;
  for (int r : members) group += (group.empty() ? "" : ",") + std::to_string(r);
  static std::mutex mu;
  static std::map<std::string, long> seqs;
  long seq;
  {
    std::lock_guard<std::mutex> lock(mu);
    seq = ++seqs[group];
  }
  const c10::intrusive_ptr<c10d::Store> store = detail::store();
  const std::string base =
      detail::str(detail::store_key_prefix(), "sdgather/", group, "/", seq, "/");
  const std::string me = std::to_string(rank());
  store->set(base + me, std::vector<std::uint8_t>{'1'});
  const double timeout_s = ckpt::default_checkpoint_timeout_s();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  std::vector<int> missing = members;
  auto sleep = std::chrono::milliseconds(1);
  while (true) {
    std::vector<int> still;
    for (int r : missing) {
      if (!store->check({base + std::to_string(r)})) still.push_back(r);
    }
    missing.swap(still);
    if (missing.empty() || std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(50));
  }
  SMP_CHECK(missing.empty(), TimeoutError, "state_dict(gather_to_rank0=True) on ",
            ckpt::internal::describe_rank(rank()), " waited ", timeout_s, " s for ",
            ckpt::internal::describe_ranks(missing),
            " of its TP_GROUP, which never called it. The full state dict is gathered over "
            "TP_GROUP: call model.state_dict() on every rank with rdp_rank() == 0 (`if "
            "smp.rdp_rank() == 0:`), not only where dp_rank() == 0 (ranks with rdp_rank() > 0 "
            "return {} at once, so calling it on every rank is also right). Raise "
            "SMP_CHECKPOINT_TIMEOUT if a rank is only slow");
  try {
    if (store->add(base + "left", 1) == static_cast<std::int64_t>(members.size())) {
      store->deleteKey(base + "left");
      for (int r : members) store->deleteKey(base + std::to_string(r));
    }
  } catch (const std::exception&) {
  }
}

}  // namespace

bool is_partial(const TensorMap& state) {
  const at::Tensor* flag = state.find(kPartialStateKey);
  return flag != nullptr && flag->defined() && flag->numel() == 1 && flag->item<bool>();
}

TensorMap partial(TensorMap local) {
  local.insert(kPartialStateKey, at::ones({}, at::kBool));
  return local;
}

TensorMap gather_full(const std::vector<FullEntry>& entries, bool keep) {
  if (std::any_of(entries.begin(), entries.end(),
                  [](const FullEntry& e) { return e.local && e.gather; })) {
    check_in_for_gather();
  }
  at::NoGradGuard no_grad;
  TensorMap out;
  for (const FullEntry& e : entries) {
    if (!e.local) continue;
    at::Tensor t = e.gather ? e.gather() : e.tensor;
    if (keep) out.insert(e.name, t.detach());
  }
  return out;
}

LoadResult load_full(const std::vector<FullEntry>& entries, const TensorMap& state, bool strict,
                     const Api& api) {
  LoadResult result;
  std::unordered_set<std::string> known;
  for (const FullEntry& e : entries) {
    known.insert(e.name);
    if (e.local && !state.contains(e.name)) result.missing.push_back(e.name);
  }
  check_keys(known, state, strict, /*partial=*/false, api, result);

  at::NoGradGuard no_grad;
  for (const FullEntry& e : entries) {
    if (!e.local || !state.contains(e.name)) continue;
    const at::Tensor& value = value_of(state, e.name, api);
    if (e.load) {
      e.load(value);
      continue;
    }
    SMP_CHECK(value.sizes() == e.tensor.sizes(), ConfigError, api.load, ": '", e.name,
              "' has shape ", value.sizes(), " in the state dict but ", e.tensor.sizes(),
              " in the model on rank ", rank(), "; load a state dict of the same model");
    e.tensor.detach().copy_(value);
  }
  return result;
}

LoadResult load_partial(const TensorMap& local, const TensorMap& state, bool strict,
                        const Api& api) {
  LoadResult result;
  std::unordered_set<std::string> known;
  for (const auto& e : local) {
    known.insert(e.key());
    if (!state.contains(e.key())) result.missing.push_back(e.key());
  }
  check_keys(known, state, strict, /*partial=*/true, api, result);

  at::NoGradGuard no_grad;
  for (const auto& e : local) {
    if (!state.contains(e.key())) continue;
    const at::Tensor& value = value_of(state, e.key(), api);
    SMP_CHECK(value.sizes() == e.value().sizes(), ConfigError, api.load, ": partial entry '",
              e.key(), "' has shape ", value.sizes(), " but this rank's (rank ", rank(),
              ", tp_rank ", tp_rank(), " of ", tp_size(), ") has ", e.value().sizes(),
              ": it was saved with another tensor-parallel layout; load a full state dict (",
              api.full_state, ") instead");
    e.value().detach().copy_(value);
  }
  return result;
}

}  // namespace smp::state_dict
