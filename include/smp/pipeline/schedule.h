#pragma once
/// Pipeline schedules: the ordered list of actions each pipeline stage runs in
/// one smp.step. Pure computation (no torch, no communication), identical on
/// every rank for the same options.
///
/// Contract of the lists built here, checked by tests/cpp/pipeline:
/// - every stage runs Forward(mb) before Backward(mb), for every microbatch;
/// - stage s > 0 runs RecvActivation(mb) before Forward(mb) and SendGrad(mb)
///   after Backward(mb); stage s < last runs SendActivation(mb) after
///   Forward(mb) and RecvGrad(mb) before Backward(mb);
/// - the send/recv operations on each link (s, s+1) appear in the same order on
///   both sides, and executing every stage's list with blocking (rendezvous)
///   sends and receives cannot deadlock: the lists are projections of one global
///   execution order (see build_schedules);
/// - kInterleaved keeps at most active_microbatches microbatches in flight
///   (forward done, backward not yet) on every stage.

#include <string>
#include <vector>

namespace smp::pipeline {

enum class ScheduleKind {
  kSimple,       ///< every forward, then every backward ("simple")
  kInterleaved,  ///< one forward one backward (1F1B) after a warm-up ("interleaved")
};

enum class ActionKind {
  kRecvActivation,  ///< receive mb's input activation from stage - 1
  kForward,         ///< run this stage's part of the forward on mb
  kSendActivation,  ///< send mb's output activation to stage + 1
  kRecvGrad,        ///< receive the gradient of mb's output from stage + 1
  kBackward,        ///< run this stage's part of the backward on mb
  kSendGrad,        ///< send the gradient of mb's input to stage - 1
};

struct Action {
  ActionKind kind;
  int microbatch;
  bool operator==(const Action& o) const { return kind == o.kind && microbatch == o.microbatch; }
  bool operator!=(const Action& o) const { return !(*this == o); }
};

struct ScheduleOptions {
  int num_stages = 1;    ///< pipeline_parallel_degree
  int microbatches = 1;  ///< smp config "microbatches"
  ScheduleKind kind = ScheduleKind::kInterleaved;
  /// Most microbatches in flight per stage with kInterleaved (ignored by
  /// kSimple); 0 means num_stages + 2, smp v1's default.
  int active_microbatches = 0;
};

/// "simple" or "interleaved"; throws ConfigError naming the value otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);
const char* to_string(ScheduleKind kind);
/// "Forward", "SendActivation", ...
const char* to_string(ActionKind kind);
/// e.g. "Forward(3)".
std::string to_string(const Action& action);

/// The order of Forward and Backward actions of `stage` (no communication).
/// kSimple: F0..F(n-1), B0..B(n-1). kInterleaved: w = min(num_stages - stage - 1,
/// microbatches, active - 1) warm-up forwards, then F(w+i), B(i) for each i
/// (the forward only while microbatches remain), then the remaining backwards.
/// Throws ConfigError for options out of range, naming the option.
std::vector<Action> compute_order(const ScheduleOptions& options, int stage);

/// Every stage's full list (compute and communication), index = stage. Built by
/// simulating one global execution: a transfer on link (s, s+1) happens when
/// the sender has produced the data and the receiver's next compute action
/// needs it; each stage's list is its projection of that execution.
std::vector<std::vector<Action>> build_schedules(const ScheduleOptions& options);

/// build_schedules(options)[stage].
std::vector<Action> build_schedule(const ScheduleOptions& options, int stage);

/// Largest number of microbatches in flight (Forward done, Backward not yet)
/// at any point of `actions`.
int max_in_flight(const std::vector<Action>& actions);

}  // namespace smp::pipeline
