#include "comm/gloo/communicator.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <functional>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "smp/core/error.h"

namespace smp::gloo {
namespace {

// Tags of point-to-point messages: a byte message never matches a tensor recv.
constexpr int kTensorTag = 0;
constexpr int kBytesSizeTag = 1;
constexpr int kBytesDataTag = 2;

at::ScalarType scalar_type(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return at::kFloat;
    case DataType::kFloat64: return at::kDouble;
    case DataType::kFloat16: return at::kHalf;
    case DataType::kBFloat16: return at::kBFloat16;
    case DataType::kInt8: return at::kChar;
    case DataType::kUInt8: return at::kByte;
    case DataType::kInt32: return at::kInt;
    case DataType::kInt64: return at::kLong;
    case DataType::kBool: return at::kBool;
  }
  SMP_THROW(NotSupportedError, "gloo: unknown data type ", static_cast<int>(dtype));
}

c10d::ReduceOp c10d_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return c10d::ReduceOp::SUM;
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    case ReduceOp::kProduct: return c10d::ReduceOp::PRODUCT;
  }
  SMP_THROW(NotSupportedError, "gloo: unknown reduce op ", static_cast<int>(op));
}

std::string message_of(const std::exception& e) {
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) return c10e->what_without_backtrace();
  return e.what();
}

bool mentions_timeout(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text.find("timed out") != std::string::npos || text.find("timeout") != std::string::npos;
}

std::shared_ptr<::gloo::transport::Device> make_device() {
  // Same choice as torch.distributed: GLOO_SOCKET_IFNAME names the interface,
  // else the address this host's name resolves to (loopback as a fallback).
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname) {
    std::string first(ifname);
    first = first.substr(0, first.find(','));
    return c10d::ProcessGroupGloo::createDeviceForInterface(first);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(c10::intrusive_ptr<c10d::ProcessGroupGloo> pg, std::string name,
                   std::vector<int> members, int world_rank)
      : Communicator(std::move(name), std::move(members), world_rank), pg_(std::move(pg)) {}

  const char* backend() const override { return "gloo"; }

  void allreduce(void* data, std::size_t count, DataType dtype, ReduceOp op,
                 const CommOptions& options) override {
    if (count == 0) return;
    std::vector<at::Tensor> tensors{view(data, count, dtype)};
    run("allreduce", options, [&] {
      c10d::AllreduceOptions o;
      o.reduceOp = c10d_op(op);
      o.timeout = options.timeout;
      return pg_->allreduce(tensors, o);
    });
    if (op == ReduceOp::kAvg) divide(tensors[0]);
  }

  void allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                 const CommOptions& options) override {
    if (count == 0) return;
    std::vector<at::Tensor> inputs{view(send, count, dtype)};
    std::vector<std::vector<at::Tensor>> outputs(1);
    const std::size_t block = count * element_size(dtype);
    for (int i = 0; i < size(); ++i) {
      outputs[0].push_back(view(static_cast<char*>(recv) + i * block, count, dtype));
    }
    run("allgather", options, [&] {
      c10d::AllgatherOptions o;
      o.timeout = options.timeout;
      return pg_->allgather(outputs, inputs, o);
    });
  }

  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DataType dtype,
                      ReduceOp op, const CommOptions& options) override {
    if (recv_count == 0) return;
    // Gloo's reduce_scatter supports few types and ops; an allreduce of a copy
    // supports all of them at size() times the traffic.
    at::Tensor all = view(send, recv_count * size(), dtype).clone();
    std::vector<at::Tensor> tensors{all};
    run("reduce_scatter", options, [&] {
      c10d::AllreduceOptions o;
      o.reduceOp = c10d_op(op);
      o.timeout = options.timeout;
      return pg_->allreduce(tensors, o);
    });
    at::Tensor mine = all.narrow(0, static_cast<std::int64_t>(rank() * recv_count),
                                 static_cast<std::int64_t>(recv_count));
    if (op == ReduceOp::kAvg) divide(mine);
    view(recv, recv_count, dtype).copy_(mine);
  }

  void broadcast(void* data, std::size_t count, DataType dtype, int root,
                 const CommOptions& options) override {
    check_peer("broadcast", root);
    if (count == 0) return;
    std::vector<at::Tensor> tensors{view(data, count, dtype)};
    run("broadcast", options, [&] {
      c10d::BroadcastOptions o;
      o.rootRank = root;
      o.timeout = options.timeout;
      return pg_->broadcast(tensors, o);
    });
  }

  void send(const void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override {
    send_tagged("send", data, count, dtype, peer, kTensorTag, options);
  }

  void recv(void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override {
    recv_tagged("recv", data, count, dtype, peer, kTensorTag, options);
  }

  void barrier(const CommOptions& options) override {
    run("barrier", options, [&] {
      c10d::BarrierOptions o;
      o.timeout = options.timeout;
      return pg_->barrier(o);
    });
  }

  void send_bytes(const std::string& bytes, int peer, const CommOptions& options) override {
    std::int64_t n = static_cast<std::int64_t>(bytes.size());
    send_tagged("send_bytes", &n, 1, DataType::kInt64, peer, kBytesSizeTag, options);
    if (n > 0) {
      send_tagged("send_bytes", bytes.data(), bytes.size(), DataType::kUInt8, peer,
                  kBytesDataTag, options);
    }
  }

  std::string recv_bytes(int peer, const CommOptions& options) override {
    std::int64_t n = 0;
    recv_tagged("recv_bytes", &n, 1, DataType::kInt64, peer, kBytesSizeTag, options);
    SMP_CHECK(n >= 0, CommError, "recv_bytes: peer ", peer, " announced ", n, " bytes in ",
              where(), "; the peer sent a tensor where a byte message was expected");
    std::string out(static_cast<std::size_t>(n), '\0');
    if (n > 0) {
      recv_tagged("recv_bytes", out.data(), out.size(), DataType::kUInt8, peer, kBytesDataTag,
                  options);
    }
    return out;
  }

 private:
  at::Tensor view(const void* data, std::size_t count, DataType dtype) const {
    return at::from_blob(const_cast<void*>(data), {static_cast<std::int64_t>(count)},
                         at::TensorOptions().dtype(scalar_type(dtype)).device(at::kCPU));
  }

  void divide(at::Tensor& t) const {
    if (at::isFloatingType(t.scalar_type())) {
      t.div_(size());
    } else {
      t.div_(size(), "trunc");
    }
  }

  void send_tagged(const char* op, const void* data, std::size_t count, DataType dtype, int peer,
                   int tag, const CommOptions& options) {
    check_peer(op, peer);
    std::vector<at::Tensor> tensors{view(data, count, dtype)};
    run(op, options, [&] { return pg_->send(tensors, peer, tag); });
  }

  void recv_tagged(const char* op, void* data, std::size_t count, DataType dtype, int peer,
                   int tag, const CommOptions& options) {
    check_peer(op, peer);
    std::vector<at::Tensor> tensors{view(data, count, dtype)};
    run(op, options, [&] { return pg_->recv(tensors, peer, tag); });
  }

  /// Starts the operation and waits for it; c10/c10d/gloo exceptions become
  /// smp errors naming the operation and the group.
  void run(const char* op, const CommOptions& options,
           const std::function<c10::intrusive_ptr<c10d::Work>()>& start) {
    std::string error;
    try {
      auto work = start();
      if (work->wait(options.timeout)) return;
      error = "the operation did not complete";
    } catch (const smp::Error&) {
      throw;
    } catch (const std::exception& e) {
      error = message_of(e);
    }
    if (mentions_timeout(error)) {
      SMP_THROW(TimeoutError, "gloo ", op, " timed out after ", options.timeout.count(),
                " ms in ", where(), ": ", error,
                "; a member may have failed or not called ", op,
                "; raise SMP_COMM_TIMEOUT (seconds) if it is only slow. Gloo closes the "
                "group's connections on a timeout: call smp.shutdown() and smp.init() to go on");
    }
    SMP_THROW(CommError, "gloo ", op, " failed in ", where(), ": ", error);
  }

  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
};

}  // namespace

std::unique_ptr<Communicator> make_group(const c10::intrusive_ptr<c10d::Store>& store,
                                         const std::string& prefix, const std::string& name,
                                         const std::vector<int>& members, int world_rank) {
  auto it = std::find(members.begin(), members.end(), world_rank);
  SMP_CHECK(it != members.end(), CommError, "gloo: world rank ", world_rank,
            " is not a member of group ", name);
  const int rank = static_cast<int>(it - members.begin());
  const auto timeout = default_comm_timeout();
  try {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(make_device());
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        prefixed, rank, static_cast<int>(members.size()), options);
    return std::make_unique<GlooCommunicator>(std::move(pg), name, members, world_rank);
  } catch (const smp::Error&) {
    throw;
  } catch (const std::exception& e) {
    const std::string error = message_of(e);
    if (mentions_timeout(error)) {
      SMP_THROW(TimeoutError, "gloo: group ", name, " (store prefix '", prefix, "', rank ", rank,
                " of ", members.size(), ", world rank ", world_rank,
                ") was not formed within ", timeout.count(), " ms: ", error,
                "; every member must call smp.init(); raise SMP_COMM_TIMEOUT if start-up is slow");
    }
    SMP_THROW(CommError, "gloo: could not create group ", name, " (store prefix '", prefix,
              "', rank ", rank, " of ", members.size(), ", world rank ", world_rank,
              "): ", error, "; set GLOO_SOCKET_IFNAME to the network interface to use");
  }
}

}  // namespace smp::gloo
