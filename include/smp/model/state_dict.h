#pragma once
/// The rules of a model's state dicts, written once for the C++
/// smp::DistributedModel and the Python smp.DistributedModel (through
/// smp._C.state_dict_*): which keys a full or partial state dict has, the
/// partial marker, the gather of the full dict and the checks and copies of a
/// load, with their errors.
///
/// Each caller walks its own module tree (torch::nn::Module in C++,
/// torch.nn.Module in Python) into a description of the state dict, in
/// torch's state_dict order:
/// - a full state dict: one FullEntry per key, a local tensor (a parameter or
///   buffer of a plain module, a buffer of a tensor-parallel one) or a full
///   parameter of a tensor-parallel module, reached through its gather and
///   load functions (the module's gather_full / load_full);
/// - a partial state dict: this rank's tensors under their names (TensorMap).

#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include <functional>
#include <string>
#include <vector>

namespace smp {

/// Name -> tensor, in the module's state order.
using TensorMap = torch::OrderedDict<std::string, at::Tensor>;

/// The key a partial state dict carries (a 0-dim bool tensor, true; a Python
/// True in Python's dicts): "_smp_is_partial".
inline constexpr const char* kPartialStateKey = "_smp_is_partial";

/// Keys a load did not find in the map, and keys of the map that the model
/// does not have.
struct LoadResult {
  std::vector<std::string> missing;
  std::vector<std::string> unexpected;
};

namespace state_dict {

/// One key of a model's full state dict as this rank holds it.
struct FullEntry {
  /// Name in the original, unwrapped model.
  std::string name;
  /// A local tensor (parameter or buffer); undefined for a full parameter of
  /// a tensor-parallel module.
  at::Tensor tensor;
  /// Set for a full parameter of a tensor-parallel module: the full tensor
  /// (collective over TP_GROUP), and copying this rank's slice of a full one in.
  std::function<at::Tensor()> gather;
  std::function<void(const at::Tensor&)> load;
  /// False for an entry of another pipeline stage: it is a key of the state
  /// dict, but this rank neither gathers, expects nor loads it.
  bool local = true;
};

/// How errors name the calling API.
struct Api {
  /// "smp::DistributedModel::load_state_dict" / "smp.DistributedModel.load_state_dict"
  std::string load;
  /// How a non-strict load is spelled: "strict=false" / "strict=False".
  std::string not_strict;
  /// The call that gives a full state dict: "state_dict_full()" / ...
  std::string full_state;
};

/// True when `state` carries kPartialStateKey -> true.
bool is_partial(const TensorMap& state);

/// `local` (this rank's tensors) plus kPartialStateKey -> true.
TensorMap partial(TensorMap local);

/// The full tensors of the local entries, detached, when `keep` (an empty map
/// otherwise: every member of TP_GROUP must call it, as the gathers are
/// collective, but one keeps the result).
TensorMap gather_full(const std::vector<FullEntry>& entries, bool keep);

/// Loads a full state dict: every local entry copies its value in (a
/// tensor-parallel parameter its slice). strict: ConfigError listing the
/// missing (local) and unexpected keys. A shape that does not fit: ConfigError
/// naming the entry.
LoadResult load_full(const std::vector<FullEntry>& entries, const TensorMap& state, bool strict,
                     const Api& api);

/// Loads a partial state dict (kPartialStateKey is skipped) into `local`,
/// copied as is; a shape that differs means another tensor-parallel layout
/// (ConfigError). strict as load_full.
LoadResult load_partial(const TensorMap& local, const TensorMap& state, bool strict,
                        const Api& api);

}  // namespace state_dict
}  // namespace smp
