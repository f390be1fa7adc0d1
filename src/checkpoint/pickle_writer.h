#pragma once
/// Writes a Value as the data.pkl of a torch.save archive (internal): pickle
/// protocol 2 in the conventions of torch.save, tensors as persistent-id
/// storages ('storage', torch.<T>Storage, key, 'cpu', numel) rebuilt with
/// torch._utils._rebuild_tensor_v2, bytes as _codecs.encode(str, 'latin1').
/// Every global it emits is one that torch.load(weights_only=True) allows.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "smp/checkpoint/value.h"
#include "smp/core/shard_spec.h"

namespace smp {
namespace ckpt {
namespace internal {

/// One storage record "data/<key>": the contiguous bytes of `tensor`.
struct PickledStorage {
  std::string key;
  at::Tensor tensor;  // as given (any device, any strides); the record holds its contiguous bytes
  c10::ScalarType dtype;
  std::uint64_t numel = 0;
  std::uint64_t nbytes = 0;
};

/// One tensor leaf, in depth-first order (a tied tensor appears once per leaf).
struct PickledTensor {
  std::vector<std::string> path;
  std::size_t storage = 0;  // index into Pickled::storages
  std::vector<std::int64_t> shape;
  std::optional<ShardSpec> shard;
};

struct Pickled {
  std::string data;
  std::vector<PickledStorage> storages;
  std::vector<PickledTensor> tensors;
};

/// Pickles `object`. The same tensor object (same TensorImpl) appearing twice
/// is pickled once and referenced (torch.load returns one tensor object);
/// distinct tensor objects viewing the same memory with the same layout share
/// one storage record. Throws CheckpointError for values torch.load cannot
/// take back (unsupported dtype, a str that is not UTF-8), naming the path.
Pickled pickle_object(const Value& object);

/// The path component of a dict key: a str as is, an int in decimal, other
/// keys as their repr().
std::string path_component(const Value& key);

/// "model_state_dict/layer.weight" style rendering for messages.
std::string join_path(const std::vector<std::string>& path);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
