#pragma once
/// Minimal leveled logging to stderr, prefixed with the rank. The level comes
/// from the environment variable SMP_LOG_LEVEL (debug, info, warning, error;
/// default warning).

#include <string>

#include "smp/core/error.h"

namespace smp {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

/// True when messages of `level` are printed.
bool log_enabled(LogLevel level);

/// Prints one line "[smp <level> rank R] message" to stderr.
void log_message(LogLevel level, const std::string& message);

/// Sets the rank shown in the log prefix (-1: unknown).
void set_log_rank(int rank);

}  // namespace smp

#define SMP_LOG(level, ...)                                                \
  do {                                                                     \
    if (::smp::log_enabled(::smp::LogLevel::level)) {                      \
      ::smp::log_message(::smp::LogLevel::level, ::smp::detail::str(__VA_ARGS__)); \
    }                                                                      \
  } while (0)
