#pragma once
/// Element types, reductions and per-call options shared by every backend.

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace smp {

enum class DataType : std::uint8_t {
  kFloat32,
  kFloat64,
  kFloat16,
  kBFloat16,
  kInt8,
  kUInt8,
  kInt32,
  kInt64,
  kBool,
};

/// Bytes per element.
std::size_t element_size(DataType dtype);
/// "float32", "bfloat16", ...
const char* to_string(DataType dtype);

enum class ReduceOp { kSum, kAvg, kMax, kMin, kProduct };
/// "sum", "avg", ...
const char* to_string(ReduceOp op);

/// Default timeout of every blocking communication call: the environment
/// variable SMP_COMM_TIMEOUT (seconds) when set, else 600 s.
std::chrono::milliseconds default_comm_timeout();

/// Options of every communication call.
struct CommOptions {
  /// The call throws TimeoutError when it has not completed within this time.
  std::chrono::milliseconds timeout = default_comm_timeout();
  /// Device backends (NCCL): the cudaStream_t to enqueue on; nullptr means the
  /// legacy default stream. CPU backends ignore it.
  void* stream = nullptr;
  /// Device backends: when false (default) the call returns once the operation
  /// is enqueued on `stream` (stream order, as torch.distributed); when true it
  /// returns after the operation completed on the device, polling it against
  /// `timeout`.
  bool blocking = false;
};

}  // namespace smp
