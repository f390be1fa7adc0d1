#pragma once
/// Value helpers (internal), defined in value.cc beside the public Value: the
/// storage-type side of the one dtype table, and the one host copy of a
/// tensor's bytes.

#include <ATen/core/Tensor.h>

#include <string>

namespace smp {
namespace ckpt {
namespace internal {

/// "FloatStorage" etc. (the torch.<T>Storage of data.pkl); nullptr for dtypes
/// checkpoints do not store.
const char* storage_type_name(c10::ScalarType dtype);
/// Inverse of storage_type_name; false for unknown names.
bool dtype_from_storage_type(const std::string& name, c10::ScalarType* dtype);

/// Host, contiguous, conj/neg resolved, detached: the exact bytes a storage
/// record holds (a no-op view for contiguous CPU tensors).
at::Tensor host_bytes(const at::Tensor& tensor);

}  // namespace internal
}  // namespace ckpt
}  // namespace smp
