#include "smp/core/topology.h"

#include <algorithm>

#include "smp/core/error.h"

namespace smp {

const char* to_string(CommGroup group) {
  switch (group) {
    case CommGroup::kWorld: return "WORLD";
    case CommGroup::kPpGroup: return "PP_GROUP";
    case CommGroup::kTpGroup: return "TP_GROUP";
    case CommGroup::kRdpGroup: return "RDP_GROUP";
    case CommGroup::kDpGroup: return "DP_GROUP";
    case CommGroup::kMpGroup: return "MP_GROUP";
  }
  return "?";
}

const char* to_string(RankType type) {
  switch (type) {
    case RankType::kWorldRank: return "WORLD_RANK";
    case RankType::kPpRank: return "PP_RANK";
    case RankType::kTpRank: return "TP_RANK";
    case RankType::kRdpRank: return "RDP_RANK";
    case RankType::kDpRank: return "DP_RANK";
    case RankType::kMpRank: return "MP_RANK";
  }
  return "?";
}

CommGroup group_of(RankType type) { return static_cast<CommGroup>(static_cast<int>(type)); }

Topology::Topology(int world_size, int pp_size, int tp_size, const std::string& placement)
    : world_size_(world_size),
      pp_size_(pp_size),
      tp_size_(tp_size),
      rdp_size_(0),
      placement_(Placement::parse(placement)) {
  SMP_CHECK(pp_size >= 1 && tp_size >= 1, ConfigError,
            "pipeline_parallel_degree (", pp_size, ") and tensor_parallel_degree (", tp_size,
            ") must be >= 1");
  SMP_CHECK(world_size >= 1 && world_size % (pp_size * tp_size) == 0, ConfigError, "world size ",
            world_size, " is not a multiple of pipeline_parallel_degree (", pp_size,
            ") x tensor_parallel_degree (", tp_size, ") = ", pp_size * tp_size);
  rdp_size_ = world_size / (pp_size * tp_size);
}

int Topology::axis_size(Axis axis) const {
  switch (axis) {
    case Axis::kData: return rdp_size_;
    case Axis::kPipeline: return pp_size_;
    case Axis::kTensor: return tp_size_;
  }
  return 0;
}

void Topology::check_rank(int rank) const {
  SMP_CHECK(rank >= 0 && rank < world_size_, ConfigError, "rank ", rank,
            " is outside the world of ", world_size_, " ranks");
}

Coord Topology::coord(int rank) const {
  check_rank(rank);
  int v[3];
  int rest = rank;
  for (int i = 2; i >= 0; --i) {
    int n = axis_size(placement_.order[i]);
    v[static_cast<int>(placement_.order[i])] = rest % n;
    rest /= n;
  }
  return Coord{v[0], v[1], v[2]};
}

int Topology::rank_of(const Coord& c) const {
  SMP_CHECK(c.rdp >= 0 && c.rdp < rdp_size_ && c.pp >= 0 && c.pp < pp_size_ && c.tp >= 0 &&
                c.tp < tp_size_,
            ConfigError, "grid coordinate (rdp ", c.rdp, ", pp ", c.pp, ", tp ", c.tp,
            ") is outside the grid (rdp ", rdp_size_, ", pp ", pp_size_, ", tp ", tp_size_, ")");
  const int v[3] = {c.rdp, c.pp, c.tp};
  int rank = 0;
  for (int i = 0; i < 3; ++i) {
    Axis a = placement_.order[i];
    rank = rank * axis_size(a) + v[static_cast<int>(a)];
  }
  return rank;
}

int Topology::dp_rank(int rank) const {
  Coord c = coord(rank);
  if (placement_.position(Axis::kTensor) > placement_.position(Axis::kData)) {
    return c.tp + tp_size_ * c.rdp;
  }
  return c.rdp + rdp_size_ * c.tp;
}

int Topology::mp_rank(int rank) const {
  Coord c = coord(rank);
  if (placement_.position(Axis::kTensor) > placement_.position(Axis::kPipeline)) {
    return c.tp + tp_size_ * c.pp;
  }
  return c.pp + pp_size_ * c.tp;
}

int Topology::rank_of_type(int rank, RankType type) const {
  switch (type) {
    case RankType::kWorldRank: check_rank(rank); return rank;
    case RankType::kPpRank: return pp_rank(rank);
    case RankType::kTpRank: return tp_rank(rank);
    case RankType::kRdpRank: return rdp_rank(rank);
    case RankType::kDpRank: return dp_rank(rank);
    case RankType::kMpRank: return mp_rank(rank);
  }
  return -1;
}

int Topology::group_size(CommGroup group) const {
  switch (group) {
    case CommGroup::kWorld: return world_size_;
    case CommGroup::kPpGroup: return pp_size_;
    case CommGroup::kTpGroup: return tp_size_;
    case CommGroup::kRdpGroup: return rdp_size_;
    case CommGroup::kDpGroup: return dp_size();
    case CommGroup::kMpGroup: return mp_size();
  }
  return 0;
}

std::vector<int> Topology::group_members(CommGroup group, int rank) const {
  const Coord me = coord(rank);
  const RankType type = static_cast<RankType>(static_cast<int>(group));
  std::vector<int> members(group_size(group), -1);
  // A rank is in my group when it agrees with me on the axes the group keeps fixed.
  for (int r = 0; r < world_size_; ++r) {
    const Coord c = coord(r);
    bool same = true;
    switch (group) {
      case CommGroup::kWorld: break;
      case CommGroup::kPpGroup: same = c.tp == me.tp && c.rdp == me.rdp; break;
      case CommGroup::kTpGroup: same = c.pp == me.pp && c.rdp == me.rdp; break;
      case CommGroup::kRdpGroup: same = c.pp == me.pp && c.tp == me.tp; break;
      case CommGroup::kDpGroup: same = c.pp == me.pp; break;
      case CommGroup::kMpGroup: same = c.rdp == me.rdp; break;
    }
    if (same) members.at(rank_of_type(r, type)) = r;
  }
  return members;
}

std::vector<std::vector<int>> Topology::all_groups(CommGroup group) const {
  std::vector<std::vector<int>> groups;
  std::vector<bool> done(world_size_, false);
  for (int r = 0; r < world_size_; ++r) {
    if (done[r]) continue;
    groups.push_back(group_members(group, r));
    for (int m : groups.back()) done[m] = true;
  }
  return groups;
}

int Topology::group_index(CommGroup group, int rank) const {
  const auto members = group_members(group, rank);
  const int lowest = *std::min_element(members.begin(), members.end());
  const auto groups = all_groups(group);
  for (std::size_t i = 0; i < groups.size(); ++i) {
    if (*std::min_element(groups[i].begin(), groups[i].end()) == lowest) return static_cast<int>(i);
  }
  return -1;
}

int Topology::peer_world_rank(int rank, RankType type, int peer) const {
  const CommGroup group = group_of(type);
  const int n = group_size(group);
  SMP_CHECK(peer >= 0 && peer < n, ConfigError, to_string(type), " ", peer,
            " does not exist: the ", to_string(group), " of rank ", rank, " has ", n,
            " members (", to_string(type), " 0..", n - 1, ")");
  return group_members(group, rank)[peer];
}

std::string Topology::describe(int rank) const {
  const Coord c = coord(rank);
  return detail::str("rank ", rank, " (rdp ", c.rdp, ", pp ", c.pp, ", tp ", c.tp, ", dp ",
                     dp_rank(rank), ", mp ", mp_rank(rank), ")");
}

}  // namespace smp
