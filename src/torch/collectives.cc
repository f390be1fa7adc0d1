#include "smp/torch/collectives.h"

#include <sstream>

#include <ATen/ATen.h>

#include "smp/config.h"
#include "smp/core/error.h"
#include "smp/runtime.h"

#if SMP_USE_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace smp {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", strides " << t.strides();
  return os.str();
}

void check_tensor(const char* op, const at::Tensor& t) {
  SMP_CHECK(t.defined(), ConfigError, "smp ", op, ": the tensor is undefined");
  SMP_CHECK(t.is_cpu() || t.is_cuda(), NotSupportedError, "smp ", op,
            ": tensors on device ", t.device(), " are not supported; use CPU or CUDA tensors");
  SMP_CHECK(t.is_contiguous(), ConfigError, "smp ", op, ": the tensor (", shape_of(t),
            ") is not contiguous; call .contiguous() first");
  to_data_type(t.scalar_type());
}

int cuda_device(const at::Tensor& t) {
#if SMP_USE_NCCL
  return t.device().has_index() ? t.device().index() : c10::cuda::current_device();
#else
  return t.device().has_index() ? t.device().index() : 0;
#endif
}

/// The communicator for `t` over `group` and the options to use with it: CUDA
/// tensors go through NCCL on the current stream of their device.
Communicator& comm_for(const at::Tensor& t, CommGroup group, const CommOptions& in,
                       CommOptions& out) {
  out = in;
  if (!t.is_cuda()) return communicator(group);
  const int device = cuda_device(t);
  Communicator& comm = device_communicator(group, device);
#if SMP_USE_NCCL
  if (out.stream == nullptr) out.stream = c10::cuda::getCurrentCUDAStream(device).stream();
#endif
  return comm;
}

/// Point-to-point: the communicator holding this process and the peer, and the
/// peer's rank in it.
std::pair<Communicator*, int> p2p_for(const at::Tensor& t, int peer, RankType type,
                                      const CommOptions& in, CommOptions& out) {
  out = in;
  const CommGroup group = group_of(type);
  if (!t.is_cuda()) {
    Communicator& comm = communicator(group);
    // Group members are ordered by the rank type of the same name.
    return {&comm, peer};
  }
  const int peer_world = topology().peer_world_rank(rank(), type, peer);
  const int device = cuda_device(t);
  Communicator& comm = device_p2p_communicator(peer_world, device);
#if SMP_USE_NCCL
  if (out.stream == nullptr) out.stream = c10::cuda::getCurrentCUDAStream(device).stream();
#endif
  return {&comm, peer_world < rank() ? 0 : 1};
}

}  // namespace

DataType to_data_type(c10::ScalarType type) {
  switch (type) {
    case at::kFloat: return DataType::kFloat32;
    case at::kDouble: return DataType::kFloat64;
    case at::kHalf: return DataType::kFloat16;
    case at::kBFloat16: return DataType::kBFloat16;
    case at::kChar: return DataType::kInt8;
    case at::kByte: return DataType::kUInt8;
    case at::kInt: return DataType::kInt32;
    case at::kLong: return DataType::kInt64;
    case at::kBool: return DataType::kBool;
    default: break;
  }
  SMP_THROW(NotSupportedError, "smp collectives do not support torch dtype ", type,
            "; supported: float32, float64, float16, bfloat16, int8, uint8, int32, int64, bool");
}

void allreduce(at::Tensor& tensor, CommGroup group, ReduceOp op, const CommOptions& options) {
  check_tensor("allreduce", tensor);
  CommOptions o;
  Communicator& comm = comm_for(tensor, group, options, o);
  comm.allreduce(tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
                 to_data_type(tensor.scalar_type()), op, o);
}

at::Tensor allgather(const at::Tensor& input, CommGroup group, const CommOptions& options) {
  check_tensor("allgather", input);
  CommOptions o;
  Communicator& comm = comm_for(input, group, options, o);
  std::vector<std::int64_t> shape{comm.size()};
  shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
  at::Tensor output = at::empty(shape, input.options());
  comm.allgather(input.data_ptr(), output.data_ptr(), static_cast<std::size_t>(input.numel()),
                 to_data_type(input.scalar_type()), o);
  return output;
}

at::Tensor reduce_scatter(const at::Tensor& input, CommGroup group, ReduceOp op,
                          const CommOptions& options) {
  check_tensor("reduce_scatter", input);
  CommOptions o;
  Communicator& comm = comm_for(input, group, options, o);
  const int n = comm.size();
  SMP_CHECK(input.dim() >= 1 && input.size(0) % n == 0, ConfigError,
            "smp reduce_scatter over ", to_string(group), ": dim 0 of the input (",
            shape_of(input), ") must be a multiple of the group size ", n,
            "; pad or reshape the input");
  std::vector<std::int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[0] /= n;
  at::Tensor output = at::empty(shape, input.options());
  comm.reduce_scatter(input.data_ptr(), output.data_ptr(),
                      static_cast<std::size_t>(output.numel()),
                      to_data_type(input.scalar_type()), op, o);
  return output;
}

void broadcast(at::Tensor& tensor, int root, CommGroup group, const CommOptions& options) {
  check_tensor("broadcast", tensor);
  CommOptions o;
  Communicator& comm = comm_for(tensor, group, options, o);
  comm.broadcast(tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
                 to_data_type(tensor.scalar_type()), root, o);
}

void send(const at::Tensor& tensor, int peer, RankType type, const CommOptions& options) {
  check_tensor("send", tensor);
  CommOptions o;
  auto [comm, p] = p2p_for(tensor, peer, type, options, o);
  comm->send(tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
             to_data_type(tensor.scalar_type()), p, o);
}

void recv(at::Tensor& tensor, int peer, RankType type, const CommOptions& options) {
  check_tensor("recv", tensor);
  CommOptions o;
  auto [comm, p] = p2p_for(tensor, peer, type, options, o);
  comm->recv(tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()),
             to_data_type(tensor.scalar_type()), p, o);
}

void barrier(CommGroup group, const CommOptions& options) {
  communicator(group).barrier(options);
}

}  // namespace smp
