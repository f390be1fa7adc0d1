#pragma once
/// Model state dicts (TensorMap) as checkpoint values, in the form Python's
/// smp.DistributedModel saves them: an OrderedDict of tensors whose
/// kPartialStateKey ("_smp_is_partial") entry is a Python bool.
///
///   smp::ckpt::save(smp::state_value(model->local_state_dict()), "/ckpt/model.pt");
///   model->load_state_dict(smp::tensor_map(smp::ckpt::load("/ckpt/model.pt")));

#include "smp/checkpoint/value.h"
#include "smp/model/distributed_model.h"

namespace smp {

/// An OrderedDict of the map's tensors; kPartialStateKey becomes the bool it
/// holds.
ckpt::Value state_value(const TensorMap& state);

/// The inverse: a dict (or OrderedDict) of str -> tensor, as a Python
/// model.state_dict() / local_state_dict() saves it; a kPartialStateKey entry
/// (bool or tensor) becomes a 0-dim bool tensor. Throws ConfigError naming
/// the key for any other entry that is not a tensor.
TensorMap tensor_map(const ckpt::Value& state);

}  // namespace smp
