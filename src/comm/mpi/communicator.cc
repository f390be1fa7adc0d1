// MPI backend: host-memory collectives over MPI communicators.
//
// Every operation is issued in its nonblocking form and polled with MPI_Test
// against a deadline (CommOptions::timeout), sleeping with a short backoff so
// that oversubscribed ranks do not spin. A timed-out receive is cancelled and
// the communicator stays usable; a timed-out collective cannot be cancelled in
// MPI, so after a collective times out the communicator must not be used
// again. One thread at a time per communicator; make_world/make_group are
// collective over the world and must be called in the same order everywhere.
#include "comm/mpi/communicator.h"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "smp/core/error.h"

namespace smp::mpi {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kTensorTag = 0x5301;
constexpr int kBytesTag = 0x5302;
/// Elements per MPI call: MPI counts are int.
constexpr std::size_t kMaxCount = static_cast<std::size_t>(INT_MAX);
/// A byte message is sent as chunks of this size followed by one shorter chunk
/// (possibly empty), so the receiver knows where it ends without a header.
constexpr std::size_t kBytesChunk = std::size_t{1} << 30;

// When MPI provides less than MPI_THREAD_MULTIPLE every MPI call takes this
// mutex. It is held only for the duration of one (nonblocking) call.
std::mutex g_call_mutex;
std::atomic<bool> g_serialize{false};

class CallLock {
 public:
  CallLock() {
    if (g_serialize.load(std::memory_order_relaxed)) lock_ = std::unique_lock<std::mutex>(g_call_mutex);
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  int klass = -1;
  {
    CallLock lock;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
    MPI_Error_class(rc, &klass);
  }
  std::string out = len > 0 ? std::string(text, len) : std::string("unknown MPI error");
  return detail::str(out, " (MPI error code ", rc, ", class ", klass, ")");
}

/// "MPI_Iallreduce(MPI_IN_PLACE, ...)" -> "MPI_Iallreduce".
std::string function_name(const char* call) {
  const char* paren = std::strchr(call, '(');
  return paren != nullptr ? std::string(call, static_cast<std::size_t>(paren - call)) : call;
}

}  // namespace
}  // namespace smp::mpi

/// Runs one MPI call (serialized when MPI lacks MPI_THREAD_MULTIPLE) and throws
/// CommError naming the MPI function, the operation, where, and MPI's text.
#define SMP_MPI_CHECK(call, op, where)                                                      \
  do {                                                                                      \
    int smp_mpi_rc_;                                                                        \
    {                                                                                       \
      ::smp::mpi::CallLock smp_mpi_lock_;                                                   \
      smp_mpi_rc_ = (call);                                                                 \
    }                                                                                       \
    if (smp_mpi_rc_ != MPI_SUCCESS) {                                                       \
      SMP_THROW(::smp::CommError, ::smp::mpi::function_name(#call), " failed in ", op,      \
                " on ", where, ": ", ::smp::mpi::mpi_error_text(smp_mpi_rc_));              \
    }                                                                                       \
  } while (0)

namespace smp::mpi {
namespace {

// ---- float16 / bfloat16 ------------------------------------------------------

std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float.
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign != 0 ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// Round to nearest, ties to even; overflow gives infinity, NaN stays NaN.
std::uint16_t float_to_half(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {
    if (abs == 0x7f800000u) return sign | 0x7c00u;
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  }
  // 65520 is halfway between 65504 (odd mantissa) and 65536: ties go up to inf.
  if (abs >= 0x477ff000u) return sign | 0x7c00u;
  if (abs < 0x38800000u) {
    // Below 2^-14: a subnormal (or zero) with mantissa round(|f| * 2^24). The
    // scaling is exact; nearbyint rounds ties to even in the default mode, and
    // a result of 1024 is exactly the encoding of the smallest normal.
    const float scaled = bits_float(abs) * 16777216.0f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(std::nearbyint(scaled)));
  }
  std::uint32_t h = (((abs >> 23) - 112u) << 10) | ((abs >> 13) & 0x3ffu);
  const std::uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) != 0)) ++h;  // a carry bumps the exponent
  return static_cast<std::uint16_t>(sign | h);
}

float bf16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

/// Round to nearest, ties to even; NaN stays a (quiet) NaN.
std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  const std::uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(rounded >> 16);
}

template <bool kBf16>
float load16(std::uint16_t v) {
  return kBf16 ? bf16_to_float(v) : half_to_float(v);
}

template <bool kBf16>
std::uint16_t store16(float v) {
  return kBf16 ? float_to_bf16(v) : float_to_half(v);
}

enum HalfOp { kHalfSum = 0, kHalfMax = 1, kHalfMin = 2, kHalfProd = 3 };

/// MPI user function: inout[i] = in[i] (op) inout[i], computed in float.
template <bool kBf16, int kOp>
void half_reduce(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    const float x = load16<kBf16>(a[i]);
    const float y = load16<kBf16>(b[i]);
    float r;
    if (kOp == kHalfSum) {
      r = x + y;
    } else if (kOp == kHalfProd) {
      r = x * y;
    } else if (kOp == kHalfMax) {
      r = (std::isnan(x) || x > y) ? x : y;  // NaN propagates, like torch
    } else {
      r = (std::isnan(x) || x < y) ? x : y;
    }
    b[i] = store16<kBf16>(r);
  }
}

// ---- process-wide state ----------------------------------------------------

struct State {
  std::mutex mutex;
  bool initialized = false;  // by initialize(), until finalize()
  /// Private duplicate of MPI_COMM_WORLD for make_group's agreement and splits,
  /// so they never interleave with the user's traffic on MPI_COMM_WORLD.
  MPI_Comm control = MPI_COMM_NULL;
  /// [0] float16, [1] bfloat16; indexed by HalfOp.
  MPI_Op half_ops[2][4] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                           {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
  int local_rank = 0;
  int local_size = 1;
};

State& state() {
  static State* s = new State();  // never destroyed: communicators may outlive static teardown
  return *s;
}

bool mpi_active() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized != 0 && finalized == 0;
}

void require_initialized(const char* fn) {
  SMP_CHECK(state().initialized && mpi_active(), StateError, "smp::mpi::", fn,
            "() called before smp::mpi::initialize() or after smp::mpi::finalize(); "
            "initialize the MPI backend first (smp::init does it under mpirun)");
}

std::string world_where() {
  int rank = -1;
  int size = -1;
  if (mpi_active()) {
    CallLock lock;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  return detail::str("world rank ", rank, " of ", size, " (backend mpi)");
}

std::string seconds(std::chrono::milliseconds t) { return detail::str(t.count() / 1000.0); }

std::string ranks_list(const std::vector<int>& ranks) {
  std::string out = "[";
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

/// now + timeout, saturating (a timeout of milliseconds::max() means no limit).
Clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  const auto now = Clock::now();
  const auto room = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - now);
  return timeout >= room ? Clock::time_point::max() : now + timeout;
}

/// Polls `req` until it completes (true) or `deadline` passes (false).
bool poll(MPI_Request* req, MPI_Status* status, Clock::time_point deadline, const std::string& op,
          const std::string& where) {
  auto backoff = std::chrono::microseconds(10);
  for (;;) {
    int done = 0;
    SMP_MPI_CHECK(MPI_Test(req, &done, status), op, where);
    if (done != 0) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::microseconds(1000));
  }
}

MPI_Datatype mpi_type(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return MPI_FLOAT;
    case DataType::kFloat64: return MPI_DOUBLE;
    case DataType::kFloat16: return MPI_UINT16_T;
    case DataType::kBFloat16: return MPI_UINT16_T;
    case DataType::kInt8: return MPI_INT8_T;
    case DataType::kUInt8: return MPI_UINT8_T;
    case DataType::kInt32: return MPI_INT32_T;
    case DataType::kInt64: return MPI_INT64_T;
    case DataType::kBool: return MPI_C_BOOL;
  }
  return MPI_DATATYPE_NULL;
}

template <typename T>
void divide_ints(void* data, std::size_t count, int n) {
  auto* p = static_cast<T*>(data);
  for (std::size_t i = 0; i < count; ++i) p[i] = static_cast<T>(p[i] / n);  // truncates, like NCCL
}

template <bool kBf16>
void divide_half(void* data, std::size_t count, int n) {
  auto* p = static_cast<std::uint16_t*>(data);
  for (std::size_t i = 0; i < count; ++i) p[i] = store16<kBf16>(load16<kBf16>(p[i]) / n);
}

/// ReduceOp::kAvg after the sum.
void divide(void* data, std::size_t count, DataType dtype, int n) {
  if (n == 1) return;
  switch (dtype) {
    case DataType::kFloat32: {
      auto* p = static_cast<float*>(data);
      for (std::size_t i = 0; i < count; ++i) p[i] /= static_cast<float>(n);
      return;
    }
    case DataType::kFloat64: {
      auto* p = static_cast<double*>(data);
      for (std::size_t i = 0; i < count; ++i) p[i] /= static_cast<double>(n);
      return;
    }
    case DataType::kFloat16: return divide_half<false>(data, count, n);
    case DataType::kBFloat16: return divide_half<true>(data, count, n);
    case DataType::kInt8: return divide_ints<std::int8_t>(data, count, n);
    case DataType::kUInt8: return divide_ints<std::uint8_t>(data, count, n);
    case DataType::kInt32: return divide_ints<std::int32_t>(data, count, n);
    case DataType::kInt64: return divide_ints<std::int64_t>(data, count, n);
    case DataType::kBool: return;
  }
}

// ---- the communicator --------------------------------------------------------

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::string name, std::vector<int> members, int world_rank, MPI_Comm comm)
      : Communicator(std::move(name), std::move(members), world_rank), comm_(comm) {}

  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_NULL && mpi_active()) {
      CallLock lock;
      MPI_Comm_free(&comm_);
    }
  }

  const char* backend() const override { return "mpi"; }

  void allreduce(void* data, std::size_t count, DataType dtype, ReduceOp op,
                 const CommOptions& options) override {
    const std::string what =
        detail::str("allreduce(", to_string(op), ", ", to_string(dtype), ", count ", count, ")");
    const Clock::time_point deadline = deadline_after(options.timeout);
    const MPI_Op mop = reduce_op("allreduce", dtype, op);
    const std::size_t es = element_size(dtype);
    auto* p = static_cast<char*>(data);
    for (std::size_t off = 0; off < count; off += kMaxCount) {
      const int n = static_cast<int>(std::min(kMaxCount, count - off));
      MPI_Request req;
      SMP_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p + off * es, n, mpi_type(dtype), mop, comm_, &req),
                    what, where());
      wait_collective(&req, what, "allreduce", options, deadline);
    }
    if (op == ReduceOp::kAvg) divide(data, count, dtype, size());
  }

  void allgather(const void* send, void* recv, std::size_t count, DataType dtype,
                 const CommOptions& options) override {
    const std::string what = detail::str("allgather(", to_string(dtype), ", count ", count, ")");
    check_count(what, count);
    const Clock::time_point deadline = deadline_after(options.timeout);
    const std::size_t es = element_size(dtype);
    // Our own block already in place is MPI_IN_PLACE; MPI forbids other aliasing.
    const void* src = send == static_cast<const char*>(recv) + rank() * count * es ? MPI_IN_PLACE : send;
    MPI_Request req;
    SMP_MPI_CHECK(MPI_Iallgather(src, static_cast<int>(count), mpi_type(dtype), recv,
                                 static_cast<int>(count), mpi_type(dtype), comm_, &req),
                  what, where());
    wait_collective(&req, what, "allgather", options, deadline);
  }

  void reduce_scatter(const void* send, void* recv, std::size_t recv_count, DataType dtype,
                      ReduceOp op, const CommOptions& options) override {
    const std::string what = detail::str("reduce_scatter(", to_string(op), ", ", to_string(dtype),
                                         ", recv_count ", recv_count, ")");
    check_count(what, recv_count);
    const Clock::time_point deadline = deadline_after(options.timeout);
    const MPI_Op mop = reduce_op("reduce_scatter", dtype, op);
    // send == recv: the input is the whole buffer and block rank() lands at its start.
    const void* src = send == recv ? MPI_IN_PLACE : send;
    MPI_Request req;
    SMP_MPI_CHECK(MPI_Ireduce_scatter_block(src, recv, static_cast<int>(recv_count),
                                            mpi_type(dtype), mop, comm_, &req),
                  what, where());
    wait_collective(&req, what, "reduce_scatter", options, deadline);
    if (op == ReduceOp::kAvg) divide(recv, recv_count, dtype, size());
  }

  void broadcast(void* data, std::size_t count, DataType dtype, int root,
                 const CommOptions& options) override {
    check_peer("broadcast", root);
    const std::string what = detail::str("broadcast(", to_string(dtype), ", count ", count,
                                         ", root ", root, ")");
    const Clock::time_point deadline = deadline_after(options.timeout);
    const std::size_t es = element_size(dtype);
    auto* p = static_cast<char*>(data);
    for (std::size_t off = 0; off < count; off += kMaxCount) {
      const int n = static_cast<int>(std::min(kMaxCount, count - off));
      MPI_Request req;
      SMP_MPI_CHECK(MPI_Ibcast(p + off * es, n, mpi_type(dtype), root, comm_, &req), what, where());
      wait_collective(&req, what, "broadcast", options, deadline);
    }
  }

  void barrier(const CommOptions& options) override {
    const Clock::time_point deadline = deadline_after(options.timeout);
    MPI_Request req;
    SMP_MPI_CHECK(MPI_Ibarrier(comm_, &req), "barrier", where());
    wait_collective(&req, "barrier", "barrier", options, deadline);
  }

  void send(const void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override {
    check_peer("send", peer);
    const std::string what = detail::str("send of ", count, " ", to_string(dtype), " to ", peer_text(peer));
    const Clock::time_point deadline = deadline_after(options.timeout);
    const std::size_t es = element_size(dtype);
    const auto* p = static_cast<const char*>(data);
    // Chunks of one message go in order: MPI does not reorder messages of one
    // (source, tag, communicator).
    std::size_t off = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxCount, count - off));
      MPI_Request req;
      SMP_MPI_CHECK(MPI_Isend(p + off * es, n, mpi_type(dtype), peer, kTensorTag, comm_, &req),
                    what, where());
      wait_p2p(&req, nullptr, what, detail::str("recv from group rank ", rank()), peer, options,
               deadline);
      off += static_cast<std::size_t>(n);
    } while (off < count);
  }

  void recv(void* data, std::size_t count, DataType dtype, int peer,
            const CommOptions& options) override {
    check_peer("recv", peer);
    const std::string what =
        detail::str("recv of ", count, " ", to_string(dtype), " from ", peer_text(peer));
    const Clock::time_point deadline = deadline_after(options.timeout);
    const std::size_t es = element_size(dtype);
    auto* p = static_cast<char*>(data);
    std::size_t off = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxCount, count - off));
      MPI_Request req;
      MPI_Status status;
      SMP_MPI_CHECK(MPI_Irecv(p + off * es, n, mpi_type(dtype), peer, kTensorTag, comm_, &req),
                    what, where());
      wait_p2p(&req, &status, what, detail::str("send to group rank ", rank()), peer, options,
               deadline);
      int got = 0;
      SMP_MPI_CHECK(MPI_Get_count(&status, mpi_type(dtype), &got), what, where());
      SMP_CHECK(got == n, CommError, what, " on ", where(), ": expected ", count, " elements",
                count > kMaxCount ? " (in chunks)" : "", " but the message holds ", got,
                "; send and recv must use the same count and dtype");
      off += static_cast<std::size_t>(n);
    } while (off < count);
  }

  void send_bytes(const std::string& bytes, int peer, const CommOptions& options) override {
    check_peer("send_bytes", peer);
    const std::string what = detail::str("send_bytes of ", bytes.size(), " bytes to ", peer_text(peer));
    const Clock::time_point deadline = deadline_after(options.timeout);
    std::size_t off = 0;
    for (;;) {
      const std::size_t n = std::min(kBytesChunk, bytes.size() - off);
      MPI_Request req;
      SMP_MPI_CHECK(MPI_Isend(bytes.data() + off, static_cast<int>(n), MPI_BYTE, peer, kBytesTag,
                              comm_, &req),
                    what, where());
      wait_p2p(&req, nullptr, what, detail::str("recv_bytes from group rank ", rank()), peer,
               options, deadline);
      off += n;
      if (n < kBytesChunk) break;
    }
  }

  std::string recv_bytes(int peer, const CommOptions& options) override {
    check_peer("recv_bytes", peer);
    const std::string what = detail::str("recv_bytes from ", peer_text(peer));
    const Clock::time_point deadline = deadline_after(options.timeout);
    std::string out;
    for (;;) {
      // Probe first: the length is not known until the message is matched.
      MPI_Message message = MPI_MESSAGE_NULL;
      MPI_Status status;
      auto backoff = std::chrono::microseconds(10);
      for (;;) {
        int found = 0;
        SMP_MPI_CHECK(MPI_Improbe(peer, kBytesTag, comm_, &found, &message, &status), what, where());
        if (found != 0) break;
        if (Clock::now() >= deadline) {
          timeout_p2p(what, detail::str("send_bytes to group rank ", rank()), peer, options);
        }
        std::this_thread::sleep_for(backoff);
        backoff = std::min(backoff * 2, std::chrono::microseconds(1000));
      }
      int n = 0;
      SMP_MPI_CHECK(MPI_Get_count(&status, MPI_BYTE, &n), what, where());
      const std::size_t off = out.size();
      out.resize(off + static_cast<std::size_t>(n));
      MPI_Request req;
      SMP_MPI_CHECK(MPI_Imrecv(&out[0] + off, n, MPI_BYTE, &message, &req), what, where());
      // The message is matched: it cannot be cancelled, only completed.
      if (!poll(&req, MPI_STATUS_IGNORE, deadline, what, where())) {
        SMP_THROW(TimeoutError, what, " on ", where(), ": the message of ", n,
                  " bytes was matched but did not arrive within ", seconds(options.timeout),
                  " s; group rank ", peer, " may have stopped; this communicator must not be used again");
      }
      if (static_cast<std::size_t>(n) < kBytesChunk) break;
    }
    return out;
  }

 private:
  std::string peer_text(int peer) const {
    return detail::str("group rank ", peer, " (world rank ", members()[peer], ")");
  }

  void check_count(const std::string& what, std::size_t count) const {
    SMP_CHECK(count <= kMaxCount, CommError, what, " on ", where(), ": ", count,
              " elements per rank exceed MPI's limit of ", kMaxCount,
              " per call; split the buffer into smaller pieces");
  }

  MPI_Op reduce_op(const char* op_name, DataType dtype, ReduceOp op) const {
    if (dtype == DataType::kBool) {
      if (op == ReduceOp::kAvg) {
        SMP_THROW(NotSupportedError, op_name, ": avg is not defined for bool on ", where(),
                  "; use max or sum (logical or) or min or product (logical and)");
      }
      return op == ReduceOp::kSum || op == ReduceOp::kMax ? MPI_LOR : MPI_LAND;
    }
    if (dtype == DataType::kFloat16 || dtype == DataType::kBFloat16) {
      const int index = dtype == DataType::kBFloat16 ? 1 : 0;
      switch (op) {
        case ReduceOp::kSum:
        case ReduceOp::kAvg: return state().half_ops[index][kHalfSum];
        case ReduceOp::kMax: return state().half_ops[index][kHalfMax];
        case ReduceOp::kMin: return state().half_ops[index][kHalfMin];
        case ReduceOp::kProduct: return state().half_ops[index][kHalfProd];
      }
    }
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg: return MPI_SUM;
      case ReduceOp::kMax: return MPI_MAX;
      case ReduceOp::kMin: return MPI_MIN;
      case ReduceOp::kProduct: return MPI_PROD;
    }
    return MPI_OP_NULL;
  }

  void wait_collective(MPI_Request* req, const std::string& what, const char* op_name,
                       const CommOptions& options, Clock::time_point deadline) const {
    if (poll(req, MPI_STATUS_IGNORE, deadline, what, where())) return;
    // MPI cannot cancel a collective: the request stays pending and the
    // communicator is unusable from here on.
    SMP_THROW(TimeoutError, what, " on ", where(), " did not complete within ",
              seconds(options.timeout), " s; members of the group (world ranks): ",
              ranks_list(members()), "; check that every member calls ", op_name,
              " (the same collectives in the same order), or raise the timeout "
              "(CommOptions::timeout, SMP_COMM_TIMEOUT); this communicator must not be used again");
  }

  /// Waits for a send/recv; on timeout cancels it and throws, unless it
  /// completed in the meantime.
  void wait_p2p(MPI_Request* req, MPI_Status* status, const std::string& what,
                const std::string& peer_should, int peer, const CommOptions& options,
                Clock::time_point deadline) const {
    MPI_Status local_status;
    MPI_Status* st = status != nullptr ? status : &local_status;
    if (poll(req, st, deadline, what, where())) return;
    SMP_MPI_CHECK(MPI_Cancel(req), what, where());
    // A cancelled receive completes locally; a send that already matched may
    // not, so give it a short grace and then let it go.
    if (poll(req, st, Clock::now() + std::chrono::seconds(1), what, where())) {
      int cancelled = 0;
      SMP_MPI_CHECK(MPI_Test_cancelled(st, &cancelled), what, where());
      if (cancelled == 0) return;  // it completed just before the cancel
    } else {
      CallLock lock;
      MPI_Request_free(req);
    }
    timeout_p2p(what, peer_should, peer, options);
  }

  [[noreturn]] void timeout_p2p(const std::string& what, const std::string& peer_should, int peer,
                                const CommOptions& options) const {
    SMP_THROW(TimeoutError, what, " on ", where(), " did not complete within ",
              seconds(options.timeout), " s; members of the group (world ranks): ",
              ranks_list(members()), "; check that group rank ", peer, " calls ", peer_should,
              " with a matching message, or raise the timeout (CommOptions::timeout, "
              "SMP_COMM_TIMEOUT)");
  }

  MPI_Comm comm_;
};

std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

}  // namespace

// ---- free functions ----------------------------------------------------------

namespace {

/// MPI cannot be initialized twice in a process, so MPI_Finalize waits for the
/// exit: smp::shutdown() followed by smp::init() keeps working.
void finalize_mpi_at_exit() {
  if (!mpi_active()) return;
  CallLock lock;
  MPI_Finalize();
}

}  // namespace

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') return true;
  }
  return false;
}

void initialize() {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.mutex);
  if (s.initialized) return;
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  SMP_CHECK(finalized == 0, StateError,
            "smp::mpi::initialize: MPI was already finalized in this process and cannot be "
            "initialized again; initialize smp before MPI is finalized (e.g. by mpi4py at exit)");
  int provided = MPI_THREAD_SINGLE;
  if (initialized == 0) {
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
    SMP_CHECK(rc == MPI_SUCCESS, CommError, "MPI_Init_thread failed in initialize: ",
              mpi_error_text(rc), "; check the MPI installation and that the job was started by mpirun");
    std::atexit(finalize_mpi_at_exit);
    SMP_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "initialize",
                  world_where());
  } else {
    SMP_MPI_CHECK(MPI_Query_thread(&provided), "initialize", world_where());
  }
  g_serialize.store(provided < MPI_THREAD_MULTIPLE);

  SMP_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &s.control), "initialize", world_where());
  SMP_MPI_CHECK(MPI_Comm_set_errhandler(s.control, MPI_ERRORS_RETURN), "initialize", world_where());
  SMP_MPI_CHECK(MPI_Comm_set_name(s.control, const_cast<char*>("smp control")), "initialize",
                world_where());

  MPI_Comm node = MPI_COMM_NULL;
  int rank = 0;
  SMP_MPI_CHECK(MPI_Comm_rank(s.control, &rank), "initialize", world_where());
  SMP_MPI_CHECK(MPI_Comm_split_type(s.control, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
                "initialize (node-local communicator)", world_where());
  SMP_MPI_CHECK(MPI_Comm_rank(node, &s.local_rank), "initialize", world_where());
  SMP_MPI_CHECK(MPI_Comm_size(node, &s.local_size), "initialize", world_where());
  SMP_MPI_CHECK(MPI_Comm_free(&node), "initialize", world_where());

  MPI_User_function* fns[2][4] = {
      {half_reduce<false, kHalfSum>, half_reduce<false, kHalfMax>, half_reduce<false, kHalfMin>,
       half_reduce<false, kHalfProd>},
      {half_reduce<true, kHalfSum>, half_reduce<true, kHalfMax>, half_reduce<true, kHalfMin>,
       half_reduce<true, kHalfProd>}};
  for (int t = 0; t < 2; ++t) {
    for (int o = 0; o < 4; ++o) {
      SMP_MPI_CHECK(MPI_Op_create(fns[t][o], /*commute=*/1, &s.half_ops[t][o]),
                    "initialize (float16/bfloat16 reductions)", world_where());
    }
  }
  s.initialized = true;
}

void finalize() {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.mutex);
  if (!s.initialized) return;
  s.initialized = false;
  if (!mpi_active()) return;  // someone else finalized MPI already
  CallLock lock;
  for (auto& row : s.half_ops) {
    for (MPI_Op& op : row) {
      if (op != MPI_OP_NULL) MPI_Op_free(&op);
    }
  }
  if (s.control != MPI_COMM_NULL) MPI_Comm_free(&s.control);
}

int world_rank() {
  require_initialized("world_rank");
  int rank = -1;
  SMP_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "world_rank", "MPI_COMM_WORLD");
  return rank;
}

int world_size() {
  require_initialized("world_size");
  int size = -1;
  SMP_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size), "world_size", "MPI_COMM_WORLD");
  return size;
}

std::pair<int, int> local_rank_and_size() {
  require_initialized("local_rank_and_size");
  return {state().local_rank, state().local_size};
}

std::unique_ptr<Communicator> make_world() {
  require_initialized("make_world");
  const int size = world_size();
  const int rank = world_rank();
  const std::chrono::milliseconds timeout = default_comm_timeout();
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Request req;
  SMP_MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &comm, &req), "make_world", world_where());
  if (!poll(&req, MPI_STATUS_IGNORE, deadline_after(timeout), "make_world", world_where())) {
    SMP_THROW(TimeoutError, "make_world on ", world_where(), " did not complete within ",
              seconds(timeout), " s; every rank of the job must create the WORLD communicator "
              "(smp::init) at the same point");
  }
  SMP_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), "make_world", world_where());
  SMP_MPI_CHECK(MPI_Comm_set_name(comm, const_cast<char*>("WORLD")), "make_world", world_where());
  std::vector<int> members(static_cast<std::size_t>(size));
  for (int i = 0; i < size; ++i) members[static_cast<std::size_t>(i)] = i;
  return std::make_unique<MpiCommunicator>("WORLD", std::move(members), rank, comm);
}

std::unique_ptr<Communicator> make_group(const std::string& name,
                                         const std::vector<std::vector<int>>& groups) {
  require_initialized("make_group");
  const int size = world_size();
  const int rank = world_rank();
  const std::string what = detail::str("make_group(", name, ")");

  // The groups must partition the world.
  std::vector<int> seen(static_cast<std::size_t>(size), -1);
  int color = -1;
  int key = -1;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    SMP_CHECK(!groups[g].empty(), CommError, what, ": group ", g,
              " is empty; every group needs at least one world rank");
    for (std::size_t i = 0; i < groups[g].size(); ++i) {
      const int r = groups[g][i];
      SMP_CHECK(r >= 0 && r < size, CommError, what, ": group ", g, " holds world rank ", r,
                ", outside the world of ", size, " ranks (valid: 0..", size - 1, ")");
      SMP_CHECK(seen[static_cast<std::size_t>(r)] < 0, CommError, what, ": world rank ", r,
                " appears in group ", seen[static_cast<std::size_t>(r)], " and in group ", g,
                "; the groups must partition the world ranks");
      seen[static_cast<std::size_t>(r)] = static_cast<int>(g);
      if (r == rank) {
        color = static_cast<int>(g);
        key = static_cast<int>(i);
      }
    }
  }
  for (int r = 0; r < size; ++r) {
    SMP_CHECK(seen[static_cast<std::size_t>(r)] >= 0, CommError, what, ": world rank ", r,
              " is in no group; the groups must partition the world ranks 0..", size - 1);
  }

  // Agree that every rank passes the same groups, with a timeout: MPI_Comm_split
  // itself has no nonblocking form and would hang on a rank that never calls.
  std::uint64_t h = fnv1a(14695981039346656037ull, name.data(), name.size());
  for (const auto& group : groups) {
    const std::uint64_t n = group.size();
    h = fnv1a(h, &n, sizeof n);
    h = fnv1a(h, group.data(), group.size() * sizeof(int));
  }
  std::uint64_t agree[2] = {h, ~h};
  State& s = state();
  const std::chrono::milliseconds timeout = default_comm_timeout();
  MPI_Request req;
  SMP_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, agree, 2, MPI_UINT64_T, MPI_MAX, s.control, &req), what,
                world_where());
  if (!poll(&req, MPI_STATUS_IGNORE, deadline_after(timeout), what, world_where())) {
    SMP_THROW(TimeoutError, what, " on ", world_where(), " did not complete within ",
              seconds(timeout), " s; every rank of the job must call make_group for the same "
              "groups in the same order");
  }
  SMP_CHECK(agree[0] == h && agree[1] == ~h, CommError, what, " on ", world_where(),
            ": the ranks passed different groups or names; every rank must pass the same "
            "partition of the world ranks, in the same order");

  MPI_Comm comm = MPI_COMM_NULL;
  SMP_MPI_CHECK(MPI_Comm_split(s.control, color, key, &comm), what, world_where());
  SMP_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), what, world_where());
  SMP_MPI_CHECK(MPI_Comm_set_name(comm, const_cast<char*>(name.c_str())), what, world_where());
  const std::vector<int>& members = groups[static_cast<std::size_t>(color)];
  int group_rank = -1;
  SMP_MPI_CHECK(MPI_Comm_rank(comm, &group_rank), what, world_where());
  if (group_rank != key) {
    CallLock lock;
    MPI_Comm_free(&comm);
    SMP_THROW(CommError, what, " on ", world_where(), ": MPI_Comm_split gave group rank ",
              group_rank, " but the group lists this rank at index ", key);
  }
  return std::make_unique<MpiCommunicator>(name, members, rank, comm);
}

}  // namespace smp::mpi
