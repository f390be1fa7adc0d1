// The state-dict rules of both DistributedModels (see smp/model/state_dict.h).

#include "smp/model/state_dict.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <sstream>
#include <unordered_set>

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
