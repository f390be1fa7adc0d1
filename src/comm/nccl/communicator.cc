#include "comm/nccl/communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "smp/core/error.h"

namespace smp::nccl {
namespace {

using Clock = std::chrono::steady_clock;

/// "2.28.3" from an NCCL version code (major*10000 + minor*100 + patch since
/// 2.9, major*1000 + minor*100 + patch before).
std::string version_from_code(int code) {
  if (code >= 10000) {
    return detail::str(code / 10000, ".", (code % 10000) / 100, ".", code % 100);
  }
  return detail::str(code / 1000, ".", (code % 1000) / 100, ".", code % 100);
}

std::string library_version() {
  int code = 0;
  if (ncclGetVersion(&code) != ncclSuccess) return "unknown";
  return version_from_code(code);
}

/// "ncclAllReduce" from the stringified call "ncclAllReduce(data, ...)".
std::string function_name(const char* expr) {
  std::string s(expr);
  return s.substr(0, s.find('('));
}

std::string seconds(std::chrono::milliseconds ms) {
  const auto count = ms.count();
  if (count % 1000 == 0) return detail::str(count / 1000, " s");
  return detail::str(static_cast<double>(count) / 1000.0, " s");
}

std::string format_members(const std::vector<int>& members) {
  std::string out = "[";
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(members[i]);
  }
  return out + "]";
}

const char* nccl_hint(ncclResult_t result) {
  switch (result) {
    case ncclUnhandledCudaError:
      return "a CUDA call inside NCCL failed: check that the buffers are device memory on the "
             "communicator's device and that the GPU is healthy (nvidia-smi); rerun with "
             "NCCL_DEBUG=INFO for details";
    case ncclSystemError:
      return "a system call inside NCCL failed (sockets, shared memory, /dev/shm size, "
             "ulimits); rerun with NCCL_DEBUG=INFO for details";
    case ncclInternalError:
      return "NCCL hit an internal error; rerun with NCCL_DEBUG=INFO and report it";
    case ncclInvalidArgument:
      return "check the buffer pointers, the element count, the dtype, the root or peer rank "
             "and the stream";
    case ncclInvalidUsage:
      return "every member of the group must call the same operations in the same order with "
             "the same count, dtype and root";
    case ncclRemoteError:
      return "a peer failed or exited; see the other ranks' output";
    default:
      return "rerun with NCCL_DEBUG=INFO for details";
  }
}

[[noreturn]] void throw_nccl_error(const char* expr, ncclResult_t result, ncclComm_t comm,
                                   const std::string& op, const std::string& where,
                                   const char* file, int line) {
  const char* last = ncclGetLastError(comm);
  std::string last_text = (last != nullptr && *last != '\0')
                              ? detail::str("; last NCCL error: ", last)
                              : std::string();
  throw CommError(detail::str("NCCL call ", function_name(expr), " failed in ", op, " on ",
                              where, ": ", ncclGetErrorString(result), last_text, " (NCCL ",
                              library_version(), "). Fix: ", nccl_hint(result), " [", file,
                              ":", line, "]"));
}

[[noreturn]] void throw_cuda_error(const char* expr, cudaError_t error, const std::string& op,
                                   const std::string& where, const char* file, int line) {
  // Clears a non-sticky error so that it does not resurface in the next
  // unrelated CUDA call (torch's launch checks).
  (void)cudaGetLastError();
  throw CommError(detail::str("CUDA call ", function_name(expr), " failed in ", op, " on ", where,
                              ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error),
                              "). Fix: check that the GPU is healthy (nvidia-smi) and that "
                              "CUDA_VISIBLE_DEVICES shows this process its device [",
                              file, ":", line, "]"));
}

}  // namespace

/// Throws CommError naming the CUDA call, `op`, `where` and cudaGetErrorString.
#define SMP_CUDA_CHECK(op, where, expr)                                              \
  do {                                                                               \
    cudaError_t smp_cuda_error_ = (expr);                                            \
    if (smp_cuda_error_ != cudaSuccess) {                                            \
      ::smp::nccl::throw_cuda_error(#expr, smp_cuda_error_, op, where, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

/// Throws CommError for an NCCL call that failed outright (ncclInProgress is a
/// success here: the caller polls the communicator's state afterwards).
#define SMP_NCCL_CHECK(op, where, comm, expr)                                               \
  do {                                                                                      \
    ncclResult_t smp_nccl_result_ = (expr);                                                 \
    if (smp_nccl_result_ != ncclSuccess && smp_nccl_result_ != ncclInProgress) {            \
      ::smp::nccl::throw_nccl_error(#expr, smp_nccl_result_, comm, op, where, __FILE__, __LINE__); \
    }                                                                                       \
  } while (0)

namespace {

/// Makes `device` current for its lifetime and restores the previous device.
class DeviceGuard {
 public:
  DeviceGuard(int device, const std::string& op, const std::string& where) {
    SMP_CUDA_CHECK(op, where, cudaGetDevice(&previous_));
    if (previous_ != device) {
      SMP_CUDA_CHECK(op, where, cudaSetDevice(device));
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

/// Backs off from spinning to 1 ms sleeps while polling a device or NCCL state.
class Backoff {
 public:
  void wait() {
    if (++polls_ < 64) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, std::chrono::microseconds(1000));
  }

 private:
  int polls_ = 0;
  std::chrono::microseconds sleep_{20};
};

ncclDataType_t to_nccl(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return ncclFloat32;
    case DataType::kFloat64: return ncclFloat64;
    case DataType::kFloat16: return ncclFloat16;
    case DataType::kBFloat16: return ncclBfloat16;
    case DataType::kInt8: return ncclInt8;
    case DataType::kUInt8: return ncclUint8;
    case DataType::kInt32: return ncclInt32;
    case DataType::kInt64: return ncclInt64;
    case DataType::kBool: return ncclUint8;
  }
  return ncclUint8;
}

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(std::string name, std::vector<int> members, int world_rank, int device,
                   ncclComm_t comm);
  ~NcclCommunicator() override;

  const char* backend() const override { return "nccl"; }

  void allreduce(void* data, std::size_t count, DataType dtype, ReduceOp op,
                 const CommOptions& options) override;
  void allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                 const CommOptions& options) override;
  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DataType dtype,
                      ReduceOp op, const CommOptions& options) override;
  void broadcast(void* data, std::size_t count, DataType dtype, int root,
                 const CommOptions& options) override;
  void send(const void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override;
  void recv(void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override;
  void barrier(const CommOptions& options) override;
  void send_bytes(const std::string& bytes, int peer, const CommOptions& options) override;
  std::string recv_bytes(int peer, const CommOptions& options) override;

 private:
  /// State of one call: its name, deadline and stream.
  struct Call {
    const char* op;
    Clock::time_point deadline;
    std::chrono::milliseconds timeout;
    cudaStream_t stream;
  };

  Call begin(const char* op, const CommOptions& options);
  ncclRedOp_t reduce_op(const char* op, DataType dtype, ReduceOp reduce) const;
  /// Rejects null, host and other-device buffers with a message that says so.
  void check_buffer(const Call& call, const void* ptr, std::size_t count, DataType dtype,
                    const char* what) const;
  /// Handles the result of an enqueue call: ncclInProgress is polled until the
  /// communicator settles; an error throws CommError (aborting the
  /// communicator when NCCL reports it broken).
  void check_enqueue(const Call& call, const char* expr, ncclResult_t result, const char* file,
                     int line);
  /// Polls ncclCommGetAsyncError until the state is not ncclInProgress.
  void wait_settled(const Call& call, const char* expr, const char* file, int line);
  /// Waits until the work enqueued on call.stream so far has completed.
  void wait_stream(const Call& call);
  void finish(const Call& call, const CommOptions& options);
  /// Aborts the communicator and records why; later calls fail fast.
  void abort(const std::string& reason);
  [[noreturn]] void fail_async(const Call& call, ncclResult_t state, const char* expr,
                               const char* file, int line);
  [[noreturn]] void fail_timeout(const Call& call, const char* waiting_for);

  int device_;
  ncclComm_t comm_;
  cudaEvent_t done_ = nullptr;
  void* scratch_ = nullptr;
  std::string aborted_;
  std::mutex mutex_;
};

#define SMP_NCCL_ENQUEUE(call, expr) check_enqueue(call, #expr, (expr), __FILE__, __LINE__)

NcclCommunicator::NcclCommunicator(std::string name, std::vector<int> members, int world_rank,
                                   int device, ncclComm_t comm)
    : Communicator(std::move(name), std::move(members), world_rank),
      device_(device),
      comm_(comm) {
  try {
    DeviceGuard guard(device_, "communicator setup", where());
    SMP_CUDA_CHECK("communicator setup", where(),
                   cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    SMP_CUDA_CHECK("communicator setup", where(), cudaMalloc(&scratch_, 256));
    SMP_CUDA_CHECK("communicator setup", where(), cudaMemset(scratch_, 0, 256));
  } catch (...) {
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    if (done_ != nullptr) (void)cudaEventDestroy(done_);
    (void)ncclCommAbort(comm_);
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() {
  int previous = -1;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (!have_previous || previous != device_) (void)cudaSetDevice(device_);
  if (comm_ != nullptr) {
    ncclResult_t state = ncclSuccess;
    bool healthy = ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclSuccess;
    if (healthy) {
      // Finalize flushes pending work and needs the peers to reach quiescence
      // too; bounded so that a peer that never destroys cannot hang shutdown.
      const auto limit = std::min<std::chrono::milliseconds>(default_comm_timeout(),
                                                             std::chrono::seconds(30));
      const auto deadline = Clock::now() + limit;
      healthy = false;
      ncclResult_t r = ncclCommFinalize(comm_);
      if (r == ncclSuccess || r == ncclInProgress) {
        Backoff backoff;
        while (ncclCommGetAsyncError(comm_, &state) == ncclSuccess) {
          if (state != ncclInProgress) {
            healthy = state == ncclSuccess;
            break;
          }
          if (Clock::now() > deadline) break;
          backoff.wait();
        }
      }
    }
    if (healthy) {
      (void)ncclCommDestroy(comm_);
    } else {
      (void)ncclCommAbort(comm_);
    }
    comm_ = nullptr;
  }
  if (scratch_ != nullptr) (void)cudaFree(scratch_);
  if (done_ != nullptr) (void)cudaEventDestroy(done_);
  (void)cudaGetLastError();
  if (have_previous && previous != device_) (void)cudaSetDevice(previous);
}

NcclCommunicator::Call NcclCommunicator::begin(const char* op, const CommOptions& options) {
  SMP_CHECK(comm_ != nullptr, CommError, op, " on ", where(),
            ": the NCCL communicator was aborted after an earlier failure (", aborted_,
            "). Fix: call smp shutdown() and init() again to recreate the communicators");
  // Capped so that a "forever" timeout cannot overflow the deadline.
  const auto timeout = std::min<std::chrono::milliseconds>(options.timeout,
                                                           std::chrono::hours(24 * 365));
  return Call{op, Clock::now() + timeout, timeout, static_cast<cudaStream_t>(options.stream)};
}

ncclRedOp_t NcclCommunicator::reduce_op(const char* op, DataType dtype, ReduceOp reduce) const {
  if (dtype == DataType::kBool) {
    // Bools travel as uint8 0/1: sum and max are a logical or, min and
    // product a logical and.
    switch (reduce) {
      case ReduceOp::kSum:
      case ReduceOp::kMax: return ncclMax;
      case ReduceOp::kMin:
      case ReduceOp::kProduct: return ncclMin;
      case ReduceOp::kAvg:
        SMP_THROW(NotSupportedError, op, " on ", where(),
                  ": reduce op avg is not defined for bool tensors. Fix: convert the tensor to "
                  "a floating point dtype first");
    }
  }
  switch (reduce) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
    case ReduceOp::kProduct: return ncclProd;
  }
  SMP_THROW(NotSupportedError, op, " on ", where(), ": unknown reduce op ",
            static_cast<int>(reduce));
}

void NcclCommunicator::check_buffer(const Call& call, const void* ptr, std::size_t count,
                                    DataType dtype, const char* what) const {
  if (count == 0) return;
  SMP_CHECK(ptr != nullptr, CommError, call.op, " on ", where(), ": the ", what,
            " buffer is null for ", count, " elements of ", to_string(dtype));
  cudaPointerAttributes attributes{};
  cudaError_t e = cudaPointerGetAttributes(&attributes, ptr);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    SMP_THROW(CommError, call.op, " on ", where(), ": the ", what, " buffer ", ptr,
              " is not known to CUDA (", cudaGetErrorString(e),
              "). Fix: pass CUDA device memory (a CUDA tensor), or use the host communicator "
              "for CPU tensors");
  }
  SMP_CHECK(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
            CommError, call.op, " on ", where(), ": the ", what, " buffer ", ptr,
            " is host memory, but the NCCL backend needs CUDA device memory. Fix: move the "
            "tensor to cuda:", device_, " or send it through the host communicator");
  SMP_CHECK(attributes.type == cudaMemoryTypeManaged || attributes.device == device_, CommError,
            call.op, " on ", where(), ": the ", what, " buffer is on cuda:", attributes.device,
            " but this group's NCCL communicator uses cuda:", device_,
            ". Fix: call torch.cuda.set_device(smp.local_rank()) before the first collective "
            "and keep the tensors of this process on that device");
}

void NcclCommunicator::abort(const std::string& reason) {
  if (comm_ == nullptr) return;
  (void)ncclCommAbort(comm_);
  comm_ = nullptr;
  aborted_ = reason;
}

void NcclCommunicator::fail_async(const Call& call, ncclResult_t state, const char* expr,
                                  const char* file, int line) {
  std::string message;
  try {
    throw_nccl_error(expr, state, comm_, call.op, where(), file, line);
  } catch (const CommError& e) {
    message = e.what();
  }
  abort(detail::str(call.op, " failed: ", ncclGetErrorString(state)));
  throw CommError(message + " The communicator was aborted.");
}

void NcclCommunicator::fail_timeout(const Call& call, const char* waiting_for) {
  abort(detail::str(call.op, " timed out"));
  throw TimeoutError(detail::str(
      "NCCL ", call.op, " on ", where(), " did not complete within ", seconds(call.timeout),
      " (", waiting_for, "); group members (world ranks): ", format_members(members()),
      ". The communicator was aborted. Fix: make sure every member calls the same operation "
      "(check the rank conditions around the call, e.g. rdp_rank() vs dp_rank()) and that no "
      "peer died; raise SMP_COMM_TIMEOUT if the operation is only slow"));
}

void NcclCommunicator::wait_settled(const Call& call, const char* expr, const char* file,
                                    int line) {
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    SMP_NCCL_CHECK(call.op, where(), comm_, ncclCommGetAsyncError(comm_, &state));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail_async(call, state, expr, file, line);
    if (Clock::now() > call.deadline) fail_timeout(call, "waiting for NCCL to enqueue it");
    backoff.wait();
  }
}

void NcclCommunicator::check_enqueue(const Call& call, const char* expr, ncclResult_t result,
                                     const char* file, int line) {
  if (result == ncclSuccess) return;
  if (result == ncclInProgress) {
    wait_settled(call, expr, file, line);
    return;
  }
  ncclResult_t state = ncclSuccess;
  const bool broken = ncclCommGetAsyncError(comm_, &state) != ncclSuccess ||
                      (state != ncclSuccess && state != ncclInProgress);
  if (broken) fail_async(call, result, expr, file, line);
  throw_nccl_error(expr, result, comm_, call.op, where(), file, line);
}

void NcclCommunicator::wait_stream(const Call& call) {
  SMP_CUDA_CHECK(call.op, where(), cudaEventRecord(done_, call.stream));
  Backoff backoff;
  while (true) {
    cudaError_t e = cudaEventQuery(done_);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      abort(detail::str(call.op, " failed on the device: ", cudaGetErrorString(e)));
      throw_cuda_error("cudaEventQuery(done)", e, call.op, where(), __FILE__, __LINE__);
    }
    ncclResult_t state = ncclSuccess;
    SMP_NCCL_CHECK(call.op, where(), comm_, ncclCommGetAsyncError(comm_, &state));
    if (state != ncclSuccess && state != ncclInProgress) {
      fail_async(call, state, "ncclCommGetAsyncError(comm)", __FILE__, __LINE__);
    }
    if (Clock::now() > call.deadline) fail_timeout(call, "waiting for it to finish on the GPU");
    backoff.wait();
  }
}

void NcclCommunicator::finish(const Call& call, const CommOptions& options) {
  if (options.blocking) wait_stream(call);
}

void NcclCommunicator::allreduce(void* data, std::size_t count, DataType dtype, ReduceOp op,
                                 const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Call call = begin("allreduce", options);
  const ncclRedOp_t nccl_op = reduce_op(call.op, dtype, op);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, data, count, dtype, "data");
  SMP_NCCL_ENQUEUE(call, ncclAllReduce(data, data, count, to_nccl(dtype), nccl_op, comm_,
                                       call.stream));
  finish(call, options);
}

void NcclCommunicator::allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                                 const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Call call = begin("allgather", options);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, send, count, dtype, "send");
  check_buffer(call, recv, count * static_cast<std::size_t>(size()), dtype, "recv");
  SMP_NCCL_ENQUEUE(call, ncclAllGather(send, recv, count, to_nccl(dtype), comm_, call.stream));
  finish(call, options);
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, std::size_t recv_count,
                                      DataType dtype, ReduceOp op, const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Call call = begin("reduce_scatter", options);
  const ncclRedOp_t nccl_op = reduce_op(call.op, dtype, op);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, send, recv_count * static_cast<std::size_t>(size()), dtype, "send");
  check_buffer(call, recv, recv_count, dtype, "recv");
  SMP_NCCL_ENQUEUE(call, ncclReduceScatter(send, recv, recv_count, to_nccl(dtype), nccl_op,
                                           comm_, call.stream));
  finish(call, options);
}

void NcclCommunicator::broadcast(void* data, std::size_t count, DataType dtype, int root,
                                 const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_peer("broadcast", root);
  const Call call = begin("broadcast", options);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, data, count, dtype, "data");
  SMP_NCCL_ENQUEUE(call, ncclBroadcast(data, data, count, to_nccl(dtype), root, comm_,
                                       call.stream));
  finish(call, options);
}

void NcclCommunicator::send(const void* data, std::size_t count, DataType dtype, int peer,
                            const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_peer("send", peer);
  const Call call = begin("send", options);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, data, count, dtype, "send");
  SMP_NCCL_ENQUEUE(call, ncclSend(data, count, to_nccl(dtype), peer, comm_, call.stream));
  finish(call, options);
}

void NcclCommunicator::recv(void* data, std::size_t count, DataType dtype, int peer,
                            const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_peer("recv", peer);
  const Call call = begin("recv", options);
  DeviceGuard guard(device_, call.op, where());
  check_buffer(call, data, count, dtype, "recv");
  SMP_NCCL_ENQUEUE(call, ncclRecv(data, count, to_nccl(dtype), peer, comm_, call.stream));
  finish(call, options);
}

void NcclCommunicator::barrier(const CommOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Call call = begin("barrier", options);
  DeviceGuard guard(device_, call.op, where());
  SMP_NCCL_ENQUEUE(call, ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_,
                                       call.stream));
  wait_stream(call);
}

void NcclCommunicator::send_bytes(const std::string&, int, const CommOptions&) {
  unsupported("send_bytes (objects travel over the host communicator)");
}

std::string NcclCommunicator::recv_bytes(int, const CommOptions&) {
  unsupported("recv_bytes (objects travel over the host communicator)");
}

}  // namespace

std::unique_ptr<Communicator> make_group(const std::string& name, const std::vector<int>& members,
                                         int world_rank, int device, const IdExchange& exchange) {
  const auto it = std::find(members.begin(), members.end(), world_rank);
  SMP_CHECK(it != members.end(), CommError, "NCCL communicator for group ", name,
            ": world rank ", world_rank, " is not among the members ", format_members(members),
            ". Fix: call make_group only on the members of the group");
  const int rank = static_cast<int>(it - members.begin());
  const int nranks = static_cast<int>(members.size());
  const std::string where = detail::str("group ", name, " (rank ", rank, " of ", nranks,
                                        ", world rank ", world_rank, ", backend nccl, cuda:",
                                        device, ")");
  const char* op = "communicator creation";

  int device_count = 0;
  SMP_CUDA_CHECK(op, where, cudaGetDeviceCount(&device_count));
  if (device < 0 || device >= device_count) {
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    SMP_THROW(CommError, "NCCL ", op, " on ", where, ": CUDA device ", device,
              " does not exist; this process sees ", device_count, " device(s) (CUDA_VISIBLE_DEVICES=",
              visible != nullptr ? visible : "<unset>",
              "). Fix: start at most one process per GPU on each node and select the device "
              "with torch.cuda.set_device(smp.local_rank())");
  }
  DeviceGuard guard(device, op, where);

  std::string id_bytes;
  if (rank == 0) {
    ncclUniqueId id;
    SMP_NCCL_CHECK(op, where, nullptr, ncclGetUniqueId(&id));
    id_bytes.assign(reinterpret_cast<const char*>(&id), sizeof(id));
  }
  const std::string received = exchange(id_bytes);
  SMP_CHECK(received.size() == sizeof(ncclUniqueId), CommError, "NCCL ", op, " on ", where,
            ": received an NCCL unique id of ", received.size(), " bytes from group rank 0 "
            "(world rank ", members.front(), "), expected ", sizeof(ncclUniqueId),
            ". Fix: every member must create the group's device communicator together");
  ncclUniqueId id;
  std::memcpy(&id, received.data(), sizeof(id));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t result = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
  if (result != ncclSuccess && result != ncclInProgress) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    throw_nccl_error("ncclCommInitRankConfig", result, nullptr, op, where, __FILE__, __LINE__);
  }

  const auto timeout = default_comm_timeout();
  const auto deadline = Clock::now() + timeout;
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) {
      (void)ncclCommAbort(comm);
      throw_nccl_error("ncclCommGetAsyncError", r, nullptr, op, where, __FILE__, __LINE__);
    }
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      std::string message;
      try {
        throw_nccl_error("ncclCommInitRankConfig", state, comm, op, where, __FILE__, __LINE__);
      } catch (const CommError& e) {
        message = e.what();
      }
      (void)ncclCommAbort(comm);
      throw CommError(message);
    }
    if (Clock::now() > deadline) {
      (void)ncclCommAbort(comm);
      SMP_THROW(TimeoutError, "NCCL ", op, " on ", where, " did not complete within ",
                seconds(timeout), "; group members (world ranks): ", format_members(members),
                ". Fix: every member must create the group's device communicator together "
                "(its first CUDA collective on the group), each on its own GPU; raise "
                "SMP_COMM_TIMEOUT if the job is only slow to start");
    }
    backoff.wait();
  }
  return std::make_unique<NcclCommunicator>(name, members, world_rank, device, comm);
}

std::string version() { return library_version(); }

}  // namespace smp::nccl
