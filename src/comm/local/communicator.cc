// Local backend: a group whose only member is this process (world rank 0).
// Collectives are copies; send/recv to self go through FIFO queues, one for
// tensor messages and one for byte messages, so a byte message never matches
// a tensor recv. Nothing blocks: a recv with no queued message fails at once.
#include "comm/local/communicator.h"

#include <cstring>
#include <deque>
#include <mutex>
#include <utility>

#include "smp/core/error.h"

namespace smp::local {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(std::string name) : Communicator(std::move(name), {0}, 0) {}

  const char* backend() const override { return "local"; }

  void allreduce(void*, std::size_t, DataType dtype, ReduceOp op, const CommOptions&) override {
    check_reduce("allreduce", dtype, op);  // the reduction of one value is the value
  }

  void allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                 const CommOptions&) override {
    copy(send, recv, count * element_size(dtype));
  }

  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DataType dtype,
                      ReduceOp op, const CommOptions&) override {
    check_reduce("reduce_scatter", dtype, op);
    copy(send, recv, recv_count * element_size(dtype));
  }

  void broadcast(void*, std::size_t, DataType, int root, const CommOptions&) override {
    check_peer("broadcast", root);
  }

  void barrier(const CommOptions&) override {}

  void send(const void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions&) override {
    check_peer("send", peer);
    std::string bytes(count * element_size(dtype), '\0');
    if (!bytes.empty()) std::memcpy(&bytes[0], data, bytes.size());
    std::lock_guard<std::mutex> guard(mutex_);
    tensors_.push_back(TensorMessage{dtype, count, std::move(bytes)});
  }

  void recv(void* data, std::size_t count, DataType dtype, int peer, const CommOptions&) override {
    check_peer("recv", peer);
    TensorMessage message;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      SMP_CHECK(!tensors_.empty(), CommError, "recv of ", count, " ", to_string(dtype), " on ",
                where(), ": no message was sent to self; in a group of one, call send to rank 0 "
                "before recv");
      message = std::move(tensors_.front());
      tensors_.pop_front();
    }
    SMP_CHECK(message.dtype == dtype && message.count == count, CommError, "recv of ", count, " ",
              to_string(dtype), " on ", where(), ": the next message sent to self holds ",
              message.count, " ", to_string(message.dtype),
              "; send and recv must use the same count and dtype");
    if (!message.bytes.empty()) std::memcpy(data, message.bytes.data(), message.bytes.size());
  }

  void send_bytes(const std::string& bytes, int peer, const CommOptions&) override {
    check_peer("send_bytes", peer);
    std::lock_guard<std::mutex> guard(mutex_);
    byte_messages_.push_back(bytes);
  }

  std::string recv_bytes(int peer, const CommOptions&) override {
    check_peer("recv_bytes", peer);
    std::lock_guard<std::mutex> guard(mutex_);
    SMP_CHECK(!byte_messages_.empty(), CommError, "recv_bytes on ", where(),
              ": no message was sent to self; in a group of one, call send_bytes to rank 0 "
              "before recv_bytes");
    std::string out = std::move(byte_messages_.front());
    byte_messages_.pop_front();
    return out;
  }

 private:
  struct TensorMessage {
    DataType dtype = DataType::kUInt8;
    std::size_t count = 0;
    std::string bytes;
  };

  static void copy(const void* from, void* to, std::size_t n) {
    if (n > 0 && from != to) std::memmove(to, from, n);
  }

  void check_reduce(const char* op_name, DataType dtype, ReduceOp op) const {
    // Same contract as the other backends, so code that runs on one process
    // fails the same way it would on many.
    SMP_CHECK(!(dtype == DataType::kBool && op == ReduceOp::kAvg), NotSupportedError, op_name,
              ": avg is not defined for bool on ", where(),
              "; use max or sum (logical or) or min or product (logical and)");
  }

  std::mutex mutex_;
  std::deque<TensorMessage> tensors_;
  std::deque<std::string> byte_messages_;
};

}  // namespace

std::unique_ptr<Communicator> make_group(const std::string& name) {
  return std::make_unique<LocalCommunicator>(name);
}

}  // namespace smp::local
