#pragma once
/// The state of libtorch's C++ optimizers in the form Python's torch.optim
/// state_dict() has, so that smp::DistributedOptimizer writes and reads the
/// same files as smp.DistributedOptimizer (python/smp/optimizer.py).
///
/// Supported: torch::optim::Adam, AdamW, SGD, Adagrad and RMSprop, each mapped
/// to its Python namesake (per-parameter state keys, "step" as a float32
/// 0-dim tensor, every key of the Python param group; keys C++ has no option
/// for get Python's defaults: maximize False, foreach None, ...). Other
/// optimizers raise NotSupportedError naming the supported ones.
///
/// Also a compact byte encoding of checkpoint values, for the object
/// collectives of DistributedOptimizer::state_dict() (tensors travel as CPU
/// bytes).

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <cstddef>
#include <memory>
#include <string>

#include "smp/checkpoint/value.h"

namespace smp {
namespace detail {

/// Python's name of the optimizer's class ("Adam", "SGD", ...); throws
/// NotSupportedError for an optimizer this file does not map.
std::string optimizer_kind(const torch::optim::Optimizer& optimizer);

/// `param`'s state as Python torch.optim holds it ({"step": tensor(float32),
/// "exp_avg": ..., ...}), sharing the live tensors; None when it has none.
ckpt::Value param_state_value(const torch::optim::Optimizer& optimizer, const at::Tensor& param);

/// `param`'s state built from `state` (Python's form; tensors are copied to
/// the parameter's device and, when floating, its dtype); nullptr when the
/// state means "none" (SGD without a momentum buffer). Throws ConfigError
/// naming `name` and the key when a key the optimizer needs is missing or has
/// the wrong shape. Does not change the optimizer.
std::unique_ptr<torch::optim::OptimizerParamState> make_param_state(
    const torch::optim::Optimizer& optimizer, const at::Tensor& param, const ckpt::Value& state,
    const std::string& name);

/// Removes the state of every parameter of the optimizer.
void clear_state(torch::optim::Optimizer& optimizer);

/// Param group `group`'s hyperparameters as Python's state_dict() lists them
/// (a dict without "params").
ckpt::Value group_hyper(const torch::optim::Optimizer& optimizer, std::size_t group);

/// Sets group `group`'s options from a saved param group (keys absent keep
/// their value). NotSupportedError for a setting C++ cannot apply (maximize),
/// ConfigError when the saved group belongs to another optimizer class.
void set_group_hyper(torch::optim::Optimizer& optimizer, std::size_t group,
                     const ckpt::Value& saved);

/// A value as bytes and back (None, bool, int, float, str, bytes, list,
/// tuple, dict and dense tensors; tensors come back on the CPU).
std::string encode_value(const ckpt::Value& value);
ckpt::Value decode_value(const std::string& bytes);

}  // namespace detail
}  // namespace smp
