#pragma once
/// A communicator over the members of one group. Backends (comm/mpi, comm/nccl,
/// comm/gloo, comm/local) derive from it and implement the operations they
/// support; the base class answers the others with NotSupportedError ("backend
/// X does not support Y"). Buffers are raw memory on the backend's device: the
/// torch adapter (smp/torch/collectives.h) maps tensors onto them.
///
/// Ranks passed to and returned by a communicator are ranks within its group.
/// Every call blocks until done or until its timeout (TimeoutError), and
/// failures of the underlying library raise CommError naming the operation,
/// the group, this rank and the library's own error text.

#include <string>
#include <vector>

#include "smp/comm/types.h"

namespace smp {

class Communicator {
 public:
  /// `name` names the group in messages ("TP_GROUP"); `members[i]` is the
  /// world rank of group rank i; `world_rank` is this process.
  Communicator(std::string name, std::vector<int> members, int world_rank);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  const std::string& name() const { return name_; }
  /// Rank of this process within the group.
  int rank() const { return rank_; }
  int size() const { return static_cast<int>(members_.size()); }
  const std::vector<int>& members() const { return members_; }
  int world_rank() const { return world_rank_; }
  /// "mpi", "nccl", "gloo", "local".
  virtual const char* backend() const = 0;

  /// In place: data holds `count` elements on entry and the reduction on exit.
  virtual void allreduce(void* data, std::size_t count, DataType dtype, ReduceOp op,
                         const CommOptions& options = {});
  /// recv holds size() * count elements, group rank i's block at i * count.
  virtual void allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                         const CommOptions& options = {});
  /// send holds size() * recv_count elements; this rank receives the reduction
  /// of block rank().
  virtual void reduce_scatter(const void* send, void* recv, std::size_t recv_count,
                              DataType dtype, ReduceOp op, const CommOptions& options = {});
  virtual void broadcast(void* data, std::size_t count, DataType dtype, int root,
                         const CommOptions& options = {});
  virtual void send(const void* data, std::size_t count, DataType dtype, int peer,
                    const CommOptions& options = {});
  virtual void recv(void* data, std::size_t count, DataType dtype, int peer,
                    const CommOptions& options = {});
  virtual void barrier(const CommOptions& options = {});

  /// Messages of a length the receiver does not know (serialized objects).
  /// A byte message never matches a tensor send/recv.
  virtual void send_bytes(const std::string& bytes, int peer, const CommOptions& options = {});
  virtual std::string recv_bytes(int peer, const CommOptions& options = {});
  /// Every member's bytes, index = group rank. Built on allgather.
  std::vector<std::string> allgather_bytes(const std::string& bytes,
                                           const CommOptions& options = {});
  /// Root's bytes on every member. Built on broadcast.
  std::string broadcast_bytes(const std::string& bytes, int root, const CommOptions& options = {});

  /// "group TP_GROUP (rank 1 of 2, world rank 5, backend mpi)" for messages.
  std::string where() const;

 protected:
  [[noreturn]] void unsupported(const char* op) const;
  void check_peer(const char* op, int peer) const;

 private:
  std::string name_;
  std::vector<int> members_;
  int world_rank_;
  int rank_;
};

}  // namespace smp
