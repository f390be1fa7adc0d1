#include "smp/pipeline/schedule.h"

#include <algorithm>
#include <sstream>

#include "smp/core/error.h"

namespace smp::pipeline {

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "simple") return ScheduleKind::kSimple;
  if (name == "interleaved") return ScheduleKind::kInterleaved;
  SMP_THROW(ConfigError, "pipeline schedule '", name,
            "' is not known; valid values: 'interleaved', 'simple' (smp config key 'pipeline')");
}

const char* to_string(ScheduleKind kind) {
  return kind == ScheduleKind::kSimple ? "simple" : "interleaved";
}

const char* to_string(ActionKind kind) {
  switch (kind) {
    case ActionKind::kRecvActivation: return "RecvActivation";
    case ActionKind::kForward: return "Forward";
    case ActionKind::kSendActivation: return "SendActivation";
    case ActionKind::kRecvGrad: return "RecvGrad";
    case ActionKind::kBackward: return "Backward";
    case ActionKind::kSendGrad: return "SendGrad";
  }
  return "?";
}

std::string to_string(const Action& action) {
  std::ostringstream os;
  os << to_string(action.kind) << "(" << action.microbatch << ")";
  return os.str();
}

namespace {

void check_options(const ScheduleOptions& o) {
  SMP_CHECK(o.num_stages >= 1, ConfigError, "pipeline schedule: num_stages is ", o.num_stages,
            "; it must be >= 1 (smp config key 'pipeline_parallel_degree')");
  SMP_CHECK(o.microbatches >= 1, ConfigError, "pipeline schedule: microbatches is ",
            o.microbatches, "; it must be >= 1 (smp config key 'microbatches')");
  SMP_CHECK(o.active_microbatches >= 0, ConfigError, "pipeline schedule: active_microbatches is ",
            o.active_microbatches,
            "; it must be >= 1, or 0 for num_stages + 2 (smp config key 'active_microbatches')");
}

int active_limit(const ScheduleOptions& o) {
  return o.active_microbatches > 0 ? o.active_microbatches : o.num_stages + 2;
}

}  // namespace

std::vector<Action> compute_order(const ScheduleOptions& o, int stage) {
  check_options(o);
  SMP_CHECK(stage >= 0 && stage < o.num_stages, ConfigError, "pipeline schedule: stage ", stage,
            " is out of range 0..", o.num_stages - 1);
  const int n = o.microbatches;
  std::vector<Action> out;
  out.reserve(2 * static_cast<size_t>(n));
  if (o.kind == ScheduleKind::kSimple) {
    for (int i = 0; i < n; ++i) out.push_back({ActionKind::kForward, i});
    for (int i = 0; i < n; ++i) out.push_back({ActionKind::kBackward, i});
    return out;
  }
  // Non-increasing in `stage`, which keeps the dependency graph acyclic: stage
  // s + 1 never needs more forwards from s before its first backward than s
  // runs before waiting for that backward's gradient.
  const int warmup = std::min({o.num_stages - stage - 1, n, active_limit(o) - 1});
  for (int i = 0; i < warmup; ++i) out.push_back({ActionKind::kForward, i});
  for (int i = 0; i < n; ++i) {
    if (warmup + i < n) out.push_back({ActionKind::kForward, warmup + i});
    out.push_back({ActionKind::kBackward, i});
  }
  return out;
}

std::vector<std::vector<Action>> build_schedules(const ScheduleOptions& o) {
  check_options(o);
  const int S = o.num_stages;
  const int n = o.microbatches;
  std::vector<std::vector<Action>> order(S), out(S);
  std::vector<size_t> next(S, 0);
  // Per stage and microbatch: forward/backward done, activation/grad received.
  std::vector<std::vector<char>> fwd(S, std::vector<char>(n, 0)), bwd = fwd, got_act = fwd,
                                 got_grad = fwd;
  for (int s = 0; s < S; ++s) order[s] = compute_order(o, s);

  auto needs = [&](int s) -> const Action* {
    return next[s] < order[s].size() ? &order[s][next[s]] : nullptr;
  };
  size_t remaining = 0;
  for (int s = 0; s < S; ++s) remaining += order[s].size();
  while (remaining > 0) {
    bool progressed = false;
    // Transfers first: a receiver whose next compute action waits for data
    // gets it as soon as the sender has produced it. Activations are handed
    // on downstream-first and gradients upstream-first, so that a stage
    // passes on what it has before it waits for the next input.
    for (int s = S - 1; s > 0; --s) {
      const Action* a = needs(s);
      if (a == nullptr || a->kind != ActionKind::kForward) continue;
      const int mb = a->microbatch;
      if (!got_act[s][mb] && fwd[s - 1][mb]) {
        out[s - 1].push_back({ActionKind::kSendActivation, mb});
        out[s].push_back({ActionKind::kRecvActivation, mb});
        got_act[s][mb] = 1;
        progressed = true;
      }
    }
    for (int s = 0; s < S - 1; ++s) {
      const Action* a = needs(s);
      if (a == nullptr || a->kind != ActionKind::kBackward) continue;
      const int mb = a->microbatch;
      if (!got_grad[s][mb] && bwd[s + 1][mb]) {
        out[s + 1].push_back({ActionKind::kSendGrad, mb});
        out[s].push_back({ActionKind::kRecvGrad, mb});
        got_grad[s][mb] = 1;
        progressed = true;
      }
    }
    for (int s = 0; s < S; ++s) {
      const Action* a = needs(s);
      if (a == nullptr) continue;
      const int mb = a->microbatch;
      bool ready = false;
      if (a->kind == ActionKind::kForward) {
        ready = s == 0 || got_act[s][mb];
      } else {
        ready = fwd[s][mb] && (s == S - 1 || got_grad[s][mb]);
      }
      if (!ready) continue;
      out[s].push_back(*a);
      (a->kind == ActionKind::kForward ? fwd : bwd)[s][mb] = 1;
      ++next[s];
      --remaining;
      progressed = true;
    }
    SMP_CHECK(progressed, Error, "pipeline schedule '", to_string(o.kind), "' for ", S,
              " stages and ", n, " microbatches has no executable action left (",
              remaining, " remaining); this is a bug in smp's schedule");
  }
  return out;
}

std::vector<Action> build_schedule(const ScheduleOptions& options, int stage) {
  SMP_CHECK(stage >= 0 && stage < options.num_stages, ConfigError, "pipeline schedule: stage ",
            stage, " is out of range 0..", options.num_stages - 1);
  return build_schedules(options)[stage];
}

int max_in_flight(const std::vector<Action>& actions) {
  int now = 0, most = 0;
  for (const Action& a : actions) {
    if (a.kind == ActionKind::kForward) most = std::max(most, ++now);
    if (a.kind == ActionKind::kBackward) --now;
  }
  return most;
}

}  // namespace smp::pipeline
