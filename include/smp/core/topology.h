#pragma once
/// The rank grid: where every world rank sits along the reduced-data-parallel
/// (rdp), pipeline (pp) and tensor (tp) axes, the derived dp and mp ranks, and
/// the members of each communication group. Pure arithmetic, no communication.

#include <string>
#include <vector>

#include "smp/core/placement.h"

namespace smp {

/// The groups of smp v1. Members of a group are ordered by the rank type of the
/// same name (TP_GROUP by tp_rank, DP_GROUP by dp_rank, ...), so a process's
/// index in a group equals its rank of that type.
enum class CommGroup { kWorld = 0, kPpGroup = 1, kTpGroup = 2, kRdpGroup = 3, kDpGroup = 4, kMpGroup = 5 };

enum class RankType { kWorldRank = 0, kPpRank = 1, kTpRank = 2, kRdpRank = 3, kDpRank = 4, kMpRank = 5 };

inline constexpr int kNumCommGroups = 6;

/// "WORLD", "PP_GROUP", ...
const char* to_string(CommGroup group);
/// "WORLD_RANK", "PP_RANK", ...
const char* to_string(RankType type);
/// The group whose index is a rank of this type (PP_RANK -> PP_GROUP).
CommGroup group_of(RankType type);

/// Coordinates of one rank on the grid.
struct Coord {
  int rdp = 0;
  int pp = 0;
  int tp = 0;
};

class Topology {
 public:
  /// Throws ConfigError when world_size is not a positive multiple of pp*tp or
  /// the placement is invalid.
  Topology(int world_size, int pp_size, int tp_size, const std::string& placement = "cluster");

  int world_size() const { return world_size_; }
  int pp_size() const { return pp_size_; }
  int tp_size() const { return tp_size_; }
  int rdp_size() const { return rdp_size_; }
  /// dp_size = world / pp: the data-parallel group includes the tp ranks.
  int dp_size() const { return world_size_ / pp_size_; }
  int mp_size() const { return pp_size_ * tp_size_; }
  const Placement& placement() const { return placement_; }

  Coord coord(int rank) const;
  int rank_of(const Coord& c) const;

  int pp_rank(int rank) const { return coord(rank).pp; }
  int tp_rank(int rank) const { return coord(rank).tp; }
  int rdp_rank(int rank) const { return coord(rank).rdp; }
  int dp_rank(int rank) const;
  int mp_rank(int rank) const;

  /// The rank of `rank` of the given type (WORLD_RANK: rank itself).
  int rank_of_type(int rank, RankType type) const;
  /// Size of the group kind (WORLD: world_size, TP_GROUP: tp_size, ...).
  int group_size(CommGroup group) const;

  /// World ranks in `rank`'s group of this kind, index = rank within the group.
  std::vector<int> group_members(CommGroup group, int rank) const;
  /// All groups of this kind, each ordered as group_members; groups sorted by
  /// their lowest world rank. Together they partition the world.
  std::vector<std::vector<int>> all_groups(CommGroup group) const;
  /// Index of `rank`'s group among all_groups(group).
  int group_index(CommGroup group, int rank) const;

  /// World rank of the peer with rank `peer` of `type`, in `rank`'s group of
  /// that type. Throws ConfigError when peer is out of range.
  int peer_world_rank(int rank, RankType type, int peer) const;

  /// "rank 5 (rdp 1, pp 0, tp 1, dp 3, mp 1)"
  std::string describe(int rank) const;

 private:
  void check_rank(int rank) const;
  int axis_size(Axis axis) const;

  int world_size_;
  int pp_size_;
  int tp_size_;
  int rdp_size_;
  Placement placement_;
};

}  // namespace smp
