#pragma once
/// Error hierarchy of the smp engine. Every failure the engine reports is an
/// smp::Error (or a subclass); the Python bindings translate each class to the
/// Python exception of the same name in exactly one place (python/src/errors.cc).
/// Messages say what failed, where (file, rank, group, key) and how to fix it.

#include <sstream>
#include <stdexcept>
#include <string>

namespace smp {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

/// A bad configuration value or key (smp.init), or a config that does not fit
/// the world size.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// An API used in the wrong state: init twice, a rank query before init.
class StateError : public Error {
 public:
  using Error::Error;
};

/// A failing MPI, NCCL, gloo or socket call. The message carries the library's
/// own error text, the operation, the group and the rank.
class CommError : public Error {
 public:
  using Error::Error;
};

/// A blocking operation that did not complete within its timeout.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

/// An operation the selected backend does not implement.
class NotSupportedError : public Error {
 public:
  using Error::Error;
};

/// A checkpoint file that cannot be written or read: a failing system call
/// (the message names the file, the call and the system's error text), a file
/// that is not a checkpoint, a missing record.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// A checkpoint file whose bytes are damaged: truncated, failing a CRC-32
/// check, or with inconsistent ZIP or pickle structure.
class CorruptCheckpointError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

/// A checkpoint whose data.pkl needs more than plain data to load (a global
/// that is not a tensor, storage or container type, an object hook, a bare
/// storage): safe loading refuses it instead of running code. Callers that
/// may fall back to a trusted loader (smp.load with weights_only=False, or
/// torch.load's own allowlist) catch this class.
class UnsafeLoadError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

namespace detail {
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace smp

/// Throws ErrorType with the concatenated message and the source location.
#define SMP_THROW(ErrorType, ...) \
  throw ErrorType(::smp::detail::str(__VA_ARGS__, " [", __FILE__, ":", __LINE__, "]"))

#define SMP_CHECK(cond, ErrorType, ...)  \
  do {                                   \
    if (!(cond)) {                       \
      SMP_THROW(ErrorType, __VA_ARGS__); \
    }                                    \
  } while (0)
