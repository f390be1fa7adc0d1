// Pipeline schedules: per-stage contracts, matching send/recv order on every
// link, no deadlock under rendezvous semantics, and the in-flight bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "smp/core/error.h"
#include "smp/pipeline/schedule.h"

namespace smp::pipeline {
namespace {

using K = ActionKind;

int position(const std::vector<Action>& acts, K kind, int mb) {
  auto it = std::find(acts.begin(), acts.end(), Action{kind, mb});
  return it == acts.end() ? -1 : static_cast<int>(it - acts.begin());
}

std::vector<int> sequence(const std::vector<Action>& acts, K kind) {
  std::vector<int> out;
  for (const Action& a : acts)
    if (a.kind == kind) out.push_back(a.microbatch);
  return out;
}

std::string dump(const std::vector<Action>& acts) {
  std::string s;
  for (const Action& a : acts) s += to_string(a) + " ";
  return s;
}

// Runs every stage's list with blocking sends and receives: a send and its
// receive complete together, only when both stages have them next.
bool runs_without_deadlock(const std::vector<std::vector<Action>>& all) {
  const int S = static_cast<int>(all.size());
  std::vector<size_t> pc(S, 0);
  auto next = [&](int s) -> const Action* { return pc[s] < all[s].size() ? &all[s][pc[s]] : nullptr; };
  for (;;) {
    bool progressed = false, done = true;
    for (int s = 0; s < S; ++s) {
      const Action* a = next(s);
      if (a == nullptr) continue;
      done = false;
      if (a->kind == K::kForward || a->kind == K::kBackward) {
        ++pc[s];
        progressed = true;
        continue;
      }
      int peer = (a->kind == K::kSendActivation || a->kind == K::kRecvGrad) ? s + 1 : s - 1;
      if (peer < 0 || peer >= S) return false;
      K want = a->kind == K::kSendActivation ? K::kRecvActivation
             : a->kind == K::kRecvActivation ? K::kSendActivation
             : a->kind == K::kSendGrad       ? K::kRecvGrad
                                             : K::kSendGrad;
      const Action* b = next(peer);
      if (b != nullptr && b->kind == want && b->microbatch == a->microbatch) {
        ++pc[s];
        ++pc[peer];
        progressed = true;
      }
    }
    if (done) return true;
    if (!progressed) return false;
  }
}

TEST(Schedule, ContractsForManyShapes) {
  for (ScheduleKind kind : {ScheduleKind::kSimple, ScheduleKind::kInterleaved}) {
    for (int S = 1; S <= 6; ++S) {
      for (int n = 1; n <= 9; ++n) {
        for (int active : {0, 1, 2, 3, 5}) {
          ScheduleOptions o{S, n, kind, active};
          auto all = build_schedules(o);
          std::string where = std::string(to_string(kind)) + " S=" + std::to_string(S) +
                              " n=" + std::to_string(n) + " active=" + std::to_string(active);
          ASSERT_EQ(all.size(), static_cast<size_t>(S)) << where;
          for (int s = 0; s < S; ++s) {
            const auto& a = all[s];
            std::string at = where + " stage " + std::to_string(s) + ": " + dump(a);
            size_t expected = 2 * n + (s > 0 ? 2 * n : 0) + (s < S - 1 ? 2 * n : 0);
            ASSERT_EQ(a.size(), expected) << at;
            for (int mb = 0; mb < n; ++mb) {
              int f = position(a, K::kForward, mb), b = position(a, K::kBackward, mb);
              ASSERT_GE(f, 0) << at;
              ASSERT_LT(f, b) << at;
              if (s > 0) {
                ASSERT_LT(position(a, K::kRecvActivation, mb), f) << at;
                ASSERT_GT(position(a, K::kSendGrad, mb), b) << at;
                ASSERT_GE(position(a, K::kRecvActivation, mb), 0) << at;
              } else {
                ASSERT_EQ(position(a, K::kRecvActivation, mb), -1) << at;
                ASSERT_EQ(position(a, K::kSendGrad, mb), -1) << at;
              }
              if (s < S - 1) {
                ASSERT_GT(position(a, K::kSendActivation, mb), f) << at;
                ASSERT_GE(position(a, K::kRecvGrad, mb), 0) << at;
                ASSERT_LT(position(a, K::kRecvGrad, mb), b) << at;
              } else {
                ASSERT_EQ(position(a, K::kSendActivation, mb), -1) << at;
                ASSERT_EQ(position(a, K::kRecvGrad, mb), -1) << at;
              }
            }
            if (s < S - 1) {
              EXPECT_EQ(sequence(a, K::kSendActivation), sequence(all[s + 1], K::kRecvActivation))
                  << at;
              EXPECT_EQ(sequence(a, K::kRecvGrad), sequence(all[s + 1], K::kSendGrad)) << at;
            }
            int limit = active > 0 ? active : S + 2;
            if (kind == ScheduleKind::kInterleaved) {
              EXPECT_LE(max_in_flight(a), std::max(1, std::min(limit, n))) << at;
              EXPECT_LE(max_in_flight(a), S - s) << at;
            } else {
              EXPECT_EQ(max_in_flight(a), n) << at;
            }
            EXPECT_EQ(build_schedule(o, s), a) << at;
          }
          EXPECT_TRUE(runs_without_deadlock(all)) << where;
        }
      }
    }
  }
}

TEST(Schedule, OneForwardOneBackward) {
  ScheduleOptions o{2, 4, ScheduleKind::kInterleaved, 0};
  EXPECT_EQ(dump(compute_order(o, 0)),
            "Forward(0) Forward(1) Backward(0) Forward(2) Backward(1) Forward(3) Backward(2) "
            "Backward(3) ");
  EXPECT_EQ(dump(compute_order(o, 1)),
            "Forward(0) Backward(0) Forward(1) Backward(1) Forward(2) Backward(2) Forward(3) "
            "Backward(3) ");
  ScheduleOptions simple{2, 2, ScheduleKind::kSimple, 0};
  EXPECT_EQ(dump(build_schedule(simple, 0)),
            "Forward(0) SendActivation(0) Forward(1) SendActivation(1) RecvGrad(0) Backward(0) "
            "RecvGrad(1) Backward(1) ");
  EXPECT_EQ(dump(build_schedule(simple, 1)),
            "RecvActivation(0) Forward(0) RecvActivation(1) Forward(1) Backward(0) SendGrad(0) "
            "Backward(1) SendGrad(1) ");
  // active_microbatches 1: strictly one microbatch at a time on every stage.
  ScheduleOptions one{3, 3, ScheduleKind::kInterleaved, 1};
  for (int s = 0; s < 3; ++s) EXPECT_EQ(max_in_flight(build_schedule(one, s)), 1);
}

TEST(Schedule, Errors) {
  try {
    parse_schedule_kind("gpipe");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("'gpipe' is not known; valid values: 'interleaved', 'simple'"),
              std::string::npos) << e.what();
  }
  EXPECT_EQ(parse_schedule_kind("simple"), ScheduleKind::kSimple);
  try {
    build_schedule({2, 2, ScheduleKind::kSimple, 0}, 2);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("stage 2 is out of range 0..1"), std::string::npos);
  }
  try {
    build_schedules({2, 0, ScheduleKind::kSimple, 0});
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("microbatches is 0; it must be >= 1"), std::string::npos);
  }
}

}  // namespace
}  // namespace smp::pipeline
