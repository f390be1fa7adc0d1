#include "smp/model/state_value.h"

#include <ATen/ATen.h>

#include "smp/core/error.h"

namespace smp {

ckpt::Value state_value(const TensorMap& state) {
  ckpt::Value out = ckpt::Value::ordered_dict();
  for (const auto& e : state) {
    if (e.key() == kPartialStateKey && e.value().defined() && e.value().numel() == 1) {
      out.set(e.key(), e.value().item<bool>());
      continue;
    }
    out.set(e.key(), ckpt::Value(e.value().detach()));
  }
  return out;
}

TensorMap tensor_map(const ckpt::Value& state) {
  SMP_CHECK(state.is_dict(), ConfigError, "smp::tensor_map: a model state dict must be a dict "
            "of str -> tensor, got ", to_string(state.kind()));
  TensorMap out;
  for (const auto& [k, v] : state.pairs()) {
    SMP_CHECK(k.is_string(), ConfigError, "smp::tensor_map: model state dict key ", k.repr(),
              " is not a str");
    const std::string& name = k.as_string();
    if (name == kPartialStateKey && !v.is_tensor()) {
      const bool partial = v.is_bool() ? v.as_bool() : (v.is_int() && v.as_int() != 0);
      out.insert(name, at::full({}, partial, at::kBool));
      continue;
    }
    SMP_CHECK(v.is_tensor(), ConfigError, "smp::tensor_map: model state dict entry '", name,
              "' is a ", to_string(v.kind()), ", not a tensor; pass the model's state dict "
              "(e.g. checkpoint[\"model_state_dict\"]), not the whole checkpoint");
    out.insert(name, v.tensor());
  }
  return out;
}

}  // namespace smp
