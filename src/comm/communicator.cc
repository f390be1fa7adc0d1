#include "smp/comm/communicator.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "smp/core/error.h"

namespace smp {

std::size_t element_size(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 4;
    case DataType::kFloat64: return 8;
    case DataType::kFloat16: return 2;
    case DataType::kBFloat16: return 2;
    case DataType::kInt8: return 1;
    case DataType::kUInt8: return 1;
    case DataType::kInt32: return 4;
    case DataType::kInt64: return 8;
    case DataType::kBool: return 1;
  }
  return 0;
}

const char* to_string(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return "float32";
    case DataType::kFloat64: return "float64";
    case DataType::kFloat16: return "float16";
    case DataType::kBFloat16: return "bfloat16";
    case DataType::kInt8: return "int8";
    case DataType::kUInt8: return "uint8";
    case DataType::kInt32: return "int32";
    case DataType::kInt64: return "int64";
    case DataType::kBool: return "bool";
  }
  return "?";
}

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kProduct: return "product";
  }
  return "?";
}

std::chrono::milliseconds default_comm_timeout() {
  if (const char* v = std::getenv("SMP_COMM_TIMEOUT"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    double s = std::strtod(v, &end);
    if (end != v && s > 0) return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000));
  }
  return std::chrono::seconds(600);
}

Communicator::Communicator(std::string name, std::vector<int> members, int world_rank)
    : name_(std::move(name)), members_(std::move(members)), world_rank_(world_rank), rank_(-1) {
  auto it = std::find(members_.begin(), members_.end(), world_rank_);
  SMP_CHECK(it != members_.end(), CommError, "world rank ", world_rank_, " is not a member of ",
            name_);
  rank_ = static_cast<int>(it - members_.begin());
}

std::string Communicator::where() const {
  return detail::str("group ", name_, " (rank ", rank_, " of ", size(), ", world rank ",
                     world_rank_, ", backend ", backend(), ")");
}

void Communicator::unsupported(const char* op) const {
  SMP_THROW(NotSupportedError, "backend ", backend(), " does not support ", op, " (", where(), ")");
}

void Communicator::check_peer(const char* op, int peer) const {
  SMP_CHECK(peer >= 0 && peer < size(), CommError, op, ": peer rank ", peer,
            " is outside ", where(), "; valid peers are 0..", size() - 1);
}

void Communicator::allreduce(void*, std::size_t, DataType, ReduceOp, const CommOptions&) {
  unsupported("allreduce");
}
void Communicator::allgather(const void*, void*, std::size_t, DataType, const CommOptions&) {
  unsupported("allgather");
}
void Communicator::reduce_scatter(const void*, void*, std::size_t, DataType, ReduceOp,
                                  const CommOptions&) {
  unsupported("reduce_scatter");
}
void Communicator::broadcast(void*, std::size_t, DataType, int, const CommOptions&) {
  unsupported("broadcast");
}
void Communicator::send(const void*, std::size_t, DataType, int, const CommOptions&) {
  unsupported("send");
}
void Communicator::recv(void*, std::size_t, DataType, int, const CommOptions&) {
  unsupported("recv");
}
void Communicator::barrier(const CommOptions&) { unsupported("barrier"); }

void Communicator::send_bytes(const std::string& bytes, int peer, const CommOptions& options) {
  std::int64_t n = static_cast<std::int64_t>(bytes.size());
  send(&n, 1, DataType::kInt64, peer, options);
  if (n > 0) send(bytes.data(), bytes.size(), DataType::kUInt8, peer, options);
}

std::string Communicator::recv_bytes(int peer, const CommOptions& options) {
  std::int64_t n = 0;
  recv(&n, 1, DataType::kInt64, peer, options);
  std::string out(static_cast<std::size_t>(n), '\0');
  if (n > 0) recv(out.data(), out.size(), DataType::kUInt8, peer, options);
  return out;
}

std::vector<std::string> Communicator::allgather_bytes(const std::string& bytes,
                                                       const CommOptions& options) {
  const int n = size();
  std::int64_t mine = static_cast<std::int64_t>(bytes.size());
  std::vector<std::int64_t> sizes(n, 0);
  allgather(&mine, sizes.data(), 1, DataType::kInt64, options);
  const std::int64_t max = *std::max_element(sizes.begin(), sizes.end());
  std::vector<std::string> out(n);
  if (max == 0) return out;
  std::string padded(static_cast<std::size_t>(max), '\0');
  std::memcpy(padded.data(), bytes.data(), bytes.size());
  std::string all(static_cast<std::size_t>(max) * n, '\0');
  allgather(padded.data(), all.data(), static_cast<std::size_t>(max), DataType::kUInt8, options);
  for (int i = 0; i < n; ++i) out[i] = all.substr(static_cast<std::size_t>(i * max), sizes[i]);
  return out;
}

std::string Communicator::broadcast_bytes(const std::string& bytes, int root,
                                          const CommOptions& options) {
  check_peer("broadcast_bytes", root);
  std::int64_t n = rank() == root ? static_cast<std::int64_t>(bytes.size()) : 0;
  broadcast(&n, 1, DataType::kInt64, root, options);
  std::string out = rank() == root ? bytes : std::string(static_cast<std::size_t>(n), '\0');
  if (n > 0) broadcast(out.data(), out.size(), DataType::kUInt8, root, options);
  return out;
}

}  // namespace smp
