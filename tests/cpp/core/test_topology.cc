#include "smp/core/topology.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "smp/core/error.h"

namespace smp {
namespace {

// DESIGN.md section 2: 8 ranks, tp = pp = rdp = 2, cluster.
TEST(Topology, DesignTableClusterEightRanks) {
  Topology t(8, 2, 2, "cluster");
  const int expected[8][5] = {
      // rdp pp tp dp mp
      {0, 0, 0, 0, 0}, {0, 0, 1, 1, 1}, {0, 1, 0, 0, 2}, {0, 1, 1, 1, 3},
      {1, 0, 0, 2, 0}, {1, 0, 1, 3, 1}, {1, 1, 0, 2, 2}, {1, 1, 1, 3, 3},
  };
  for (int r = 0; r < 8; ++r) {
    SCOPED_TRACE(t.describe(r));
    EXPECT_EQ(t.rdp_rank(r), expected[r][0]);
    EXPECT_EQ(t.pp_rank(r), expected[r][1]);
    EXPECT_EQ(t.tp_rank(r), expected[r][2]);
    EXPECT_EQ(t.dp_rank(r), expected[r][3]);
    EXPECT_EQ(t.mp_rank(r), expected[r][4]);
  }
  EXPECT_EQ(t.dp_size(), 4);
  EXPECT_EQ(t.rdp_size(), 2);
  EXPECT_EQ(t.mp_size(), 4);
}

TEST(Topology, ClusterFormula) {
  Topology t(24, 3, 2, "cluster");
  for (int r = 0; r < 24; ++r) {
    Coord c = t.coord(r);
    EXPECT_EQ(r, c.rdp * (3 * 2) + c.pp * 2 + c.tp);
  }
}

TEST(Topology, SpreadIsTPD) {
  Topology t(8, 2, 2, "spread");
  // TPD: rdp varies fastest, then pp, then tp.
  for (int r = 0; r < 8; ++r) {
    Coord c = t.coord(r);
    EXPECT_EQ(r, c.tp * 4 + c.pp * 2 + c.rdp);
    // T left of D: dp = rdp + rdp_size * tp; T left of P: mp = pp + pp_size * tp.
    EXPECT_EQ(t.dp_rank(r), c.rdp + 2 * c.tp);
    EXPECT_EQ(t.mp_rank(r), c.pp + 2 * c.tp);
  }
}

TEST(Topology, GroupsOfDesignTable) {
  Topology t(8, 2, 2, "cluster");
  EXPECT_EQ(t.group_members(CommGroup::kTpGroup, 5), (std::vector<int>{4, 5}));
  EXPECT_EQ(t.group_members(CommGroup::kPpGroup, 5), (std::vector<int>{5, 7}));
  EXPECT_EQ(t.group_members(CommGroup::kRdpGroup, 5), (std::vector<int>{1, 5}));
  EXPECT_EQ(t.group_members(CommGroup::kDpGroup, 5), (std::vector<int>{0, 1, 4, 5}));
  EXPECT_EQ(t.group_members(CommGroup::kMpGroup, 5), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(t.group_members(CommGroup::kWorld, 5).size(), 8u);
  EXPECT_EQ(t.peer_world_rank(5, RankType::kPpRank, 1), 7);
  EXPECT_EQ(t.peer_world_rank(5, RankType::kDpRank, 2), 4);
}

const std::vector<std::string>& all_placements() {
  static const std::vector<std::string> p = {"cluster", "spread", "DPT", "DTP", "PDT",
                                             "PTD",     "TDP",    "TPD"};
  return p;
}

// Every grid up to 64 ranks and every placement: the mapping is a bijection,
// dp/mp ranks are bijections within their groups, and every group kind
// partitions the world into groups of the right size whose members agree on
// the fixed axes.
TEST(Topology, PropertiesOfEveryGridUpTo64) {
  int grids = 0;
  for (int world = 1; world <= 64; ++world) {
    for (int pp = 1; pp <= world; ++pp) {
      for (int tp = 1; tp * pp <= world; ++tp) {
        if (world % (pp * tp) != 0) continue;
        for (const auto& placement : all_placements()) {
          ++grids;
          Topology t(world, pp, tp, placement);
          SCOPED_TRACE(::testing::Message() << "world " << world << " pp " << pp << " tp " << tp
                                            << " " << placement);
          std::set<int> seen;
          for (int r = 0; r < world; ++r) {
            Coord c = t.coord(r);
            ASSERT_EQ(t.rank_of(c), r);
            seen.insert(c.rdp * pp * tp + c.pp * tp + c.tp);
          }
          ASSERT_EQ(static_cast<int>(seen.size()), world);
          for (int g = 0; g < kNumCommGroups; ++g) {
            const CommGroup group = static_cast<CommGroup>(g);
            const RankType type = static_cast<RankType>(g);
            const auto groups = t.all_groups(group);
            ASSERT_EQ(static_cast<int>(groups.size()) * t.group_size(group), world);
            std::vector<int> count(world, 0);
            for (const auto& members : groups) {
              ASSERT_EQ(static_cast<int>(members.size()), t.group_size(group));
              for (std::size_t i = 0; i < members.size(); ++i) {
                const int m = members[i];
                ASSERT_GE(m, 0);
                ++count[m];
                ASSERT_EQ(t.rank_of_type(m, type), static_cast<int>(i));
                ASSERT_EQ(t.group_members(group, m), members);
                const Coord a = t.coord(m), b = t.coord(members[0]);
                switch (group) {
                  case CommGroup::kPpGroup: ASSERT_TRUE(a.tp == b.tp && a.rdp == b.rdp); break;
                  case CommGroup::kTpGroup: ASSERT_TRUE(a.pp == b.pp && a.rdp == b.rdp); break;
                  case CommGroup::kRdpGroup: ASSERT_TRUE(a.pp == b.pp && a.tp == b.tp); break;
                  case CommGroup::kDpGroup: ASSERT_EQ(a.pp, b.pp); break;
                  case CommGroup::kMpGroup: ASSERT_EQ(a.rdp, b.rdp); break;
                  case CommGroup::kWorld: break;
                }
              }
            }
            for (int r = 0; r < world; ++r) ASSERT_EQ(count[r], 1) << "rank " << r;
          }
        }
      }
    }
  }
  EXPECT_GT(grids, 1000);
}

TEST(Topology, Errors) {
  try {
    Topology t(6, 2, 2);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("world size 6 is not a multiple"), std::string::npos)
        << e.what();
  }
  try {
    Topology t(8, 2, 2, "DPX");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("'DPX'"), std::string::npos) << e.what();
  }
  Topology t(8, 2, 2);
  try {
    t.peer_world_rank(0, RankType::kTpRank, 2);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("TP_RANK 2 does not exist"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace smp
