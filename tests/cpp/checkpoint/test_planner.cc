// The resharding planner (smp::ckpt::plan_load): a property test over every
// pair of layouts pp x tp x rdp <= 8 (pp, tp in {1, 2, 4}) of a synthetic model,
// executing each plan with memcpy over source buffers filled with every
// element's global index; the cooperative group plans (plan_group: every shared
// element read once per group, every member receiving everything); the compact
// form of the copies; replica choice; and the error messages.
#include <gtest/gtest.h>

#include "test_util.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "smp/checkpoint/planner.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace {

using Shape = std::vector<std::int64_t>;

struct Layout {
  int pp, tp, rdp;
};

std::string str(const Layout& l) {
  return "pp" + std::to_string(l.pp) + " x tp" + std::to_string(l.tp) + " x rdp" +
         std::to_string(l.rdp);
}

std::vector<Layout> all_layouts() {
  std::vector<Layout> out;
  for (int pp : {1, 2, 4}) {
    for (int tp : {1, 2, 4}) {
      for (int rdp = 1; pp * tp * rdp <= 8; ++rdp) out.push_back({pp, tp, rdp});
    }
  }
  return out;
}

// ---- the synthetic model ----------------------------------------------------

enum class Stage { kFirst, kLayer, kLast };

struct ModelTensor {
  std::string name;
  Shape shape;
  std::size_t element_size;
  int save_dim;  // split dim at save (-1 replicated)
  int load_dim;  // split dim at load
  Stage stage;
  int layer = 0;
  int id = 0;
};

constexpr int kLayers = 4;

std::vector<ModelTensor> make_model() {
  std::vector<ModelTensor> m;
  m.push_back({"embed.vocab", {10, 6}, 4, 0, 0, Stage::kFirst});   // vocab split, uneven
  m.push_back({"embed.dim", {7, 10}, 4, 1, 1, Stage::kFirst});     // embedding-dim split
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    m.push_back({p + "fc.weight", {10, 6}, 4, 0, 0, Stage::kLayer, i});
    m.push_back({p + "fc.bias", {10}, 4, 0, 0, Stage::kLayer, i});
    m.push_back({p + "proj.weight", {5, 10}, 8, 1, 1, Stage::kLayer, i});
    m.push_back({p + "proj.bias", {5}, 4, -1, -1, Stage::kLayer, i});
    m.push_back({p + "norm.weight", {6}, 2, -1, -1, Stage::kLayer, i});
    m.push_back({p + "qkv.weight", {3, 9, 4}, 4, 1, 1, Stage::kLayer, i});
    m.push_back({p + "step", {}, 8, -1, -1, Stage::kLayer, i});
    m.push_back({p + "swap", {8, 6}, 4, 0, 1, Stage::kLayer, i});         // dim 0 -> dim 1
    m.push_back({p + "turn", {4, 6, 5}, 4, 1, 2, Stage::kLayer, i});      // dim 1 -> dim 2
    m.push_back({p + "back", {3, 5, 7}, 4, 2, 0, Stage::kLayer, i});      // dim 2 -> dim 0
    m.push_back({p + "scatter", {11, 3}, 4, -1, 0, Stage::kLayer, i});    // replicated -> split
    m.push_back({p + "gather", {3, 7, 2}, 4, 2, -1, Stage::kLayer, i});   // split -> replicated
  }
  m.push_back({"head.weight", {9, 5, 3}, 4, 2, 2, Stage::kLast});
  m.push_back({"head.empty", {0, 4}, 4, 0, 0, Stage::kLast});
  for (std::size_t i = 0; i < m.size(); ++i) m[i].id = static_cast<int>(i);
  return m;
}

const std::vector<ModelTensor>& model() {
  static const std::vector<ModelTensor> m = make_model();
  return m;
}

/// Pipeline stage of a tensor under pp stages: changes with pp.
int stage_of(const ModelTensor& t, int pp) {
  switch (t.stage) {
    case Stage::kFirst: return 0;
    case Stage::kLast: return pp - 1;
    default: return t.layer * pp / kLayers;
  }
}

ShardSpec spec_of(const Shape& shape, int dim, int tp, int tp_rank) {
  return dim < 0 || tp == 1 ? ShardSpec::replicated(shape)
                            : ShardSpec::split(shape, dim, tp, tp_rank);
}

std::string dtype_of(std::size_t es) {
  return es == 8 ? "int64" : es == 4 ? "float32" : "bfloat16";
}

/// How a checkpoint was saved.
enum class Mode {
  kV2,        // one file per (pp, tp), written by rdp 0
  kReplicas,  // one file per (pp, tp, rdp), every rdp rank a full replica
  kOwned,     // one file per (pp, tp, rdp), each tensor in its owner's file (v3 optimizer)
};

const char* str(Mode m) {
  return m == Mode::kV2 ? "v2" : m == Mode::kReplicas ? "replicas" : "owned";
}

SavedCheckpoint save(const Layout& l, Mode mode) {
  SavedCheckpoint ck;
  ck.pp_size = l.pp;
  ck.tp_size = l.tp;
  ck.rdp_size = l.rdp;
  const int rdps = mode == Mode::kV2 ? 1 : l.rdp;
  for (int pp = 0; pp < l.pp; ++pp) {
    for (int tp = 0; tp < l.tp; ++tp) {
      for (int r = 0; r < rdps; ++r) {
        SavedPart part;
        part.pp_rank = pp;
        part.tp_rank = tp;
        part.rdp_rank = mode == Mode::kV2 ? -1 : r;
        part.file = "ckpt_" + std::to_string(pp) + "_" + std::to_string(tp) +
                    (mode == Mode::kV2 ? "" : "_" + std::to_string(r));
        for (const ModelTensor& t : model()) {
          if (stage_of(t, l.pp) != pp) continue;
          if (mode == Mode::kOwned && t.id % l.rdp != r) continue;
          SavedTensor st;
          st.name = t.name;
          st.dtype = dtype_of(t.element_size);
          st.element_size = t.element_size;
          st.spec = spec_of(t.shape, t.save_dim, l.tp, tp);
          st.shape = st.spec.local_shape();
          part.tensors.push_back(st);
        }
        ck.parts.push_back(std::move(part));
      }
    }
  }
  return ck;
}

std::vector<TargetRank> targets(const Layout& l) {
  std::vector<TargetRank> out;
  for (int r = 0; r < l.rdp; ++r) {
    for (int pp = 0; pp < l.pp; ++pp) {
      for (int tp = 0; tp < l.tp; ++tp) {
        TargetRank t;
        t.pp_rank = pp;
        t.tp_rank = tp;
        t.rdp_rank = r;
        for (const ModelTensor& m : model()) {
          if (stage_of(m, l.pp) != pp) continue;
          t.tensors.push_back({m.name, dtype_of(m.element_size), m.element_size,
                               spec_of(m.shape, m.load_dim, l.tp, tp)});
        }
        out.push_back(std::move(t));
      }
    }
  }
  return out;
}

// ---- simulation -------------------------------------------------------------

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (std::int64_t e : s) n *= e;
  return n;
}

/// Global linear index of each local element of a shard.
std::vector<std::int64_t> global_indices(const ShardSpec& spec) {
  const Shape ls = spec.local_shape();
  const Shape& gs = spec.global_shape;
  const int split = spec.is_replicated() ? -1 : spec.split_dim;
  const std::int64_t offset = spec.offset();
  std::vector<std::int64_t> out(numel(ls));
  for (std::int64_t k = 0; k < numel(ls); ++k) {
    std::int64_t local = k, g = 0, stride = 1;
    for (std::size_t d = ls.size(); d-- > 0;) {
      std::int64_t i = local % ls[d];
      local /= ls[d];
      if (static_cast<int>(d) == split) i += offset;
      g += i * stride;
      stride *= gs[d];
    }
    out[k] = g;
  }
  return out;
}

/// The value element `global` of tensor `id` holds: unique per tensor and element.
std::uint64_t value_of(int id, std::int64_t global) {
  return static_cast<std::uint64_t>(id) * 1000 + static_cast<std::uint64_t>(global);
}

void store(std::uint8_t* at, std::uint64_t v, std::size_t es) { std::memcpy(at, &v, es); }

std::uint64_t load(const std::uint8_t* at, std::size_t es) {
  std::uint64_t v = 0;
  std::memcpy(&v, at, es);
  return v;
}

const std::map<std::string, int>& ids() {
  static const std::map<std::string, int> out = [] {
    std::map<std::string, int> m;
    for (const ModelTensor& t : model()) m[t.name] = t.id;
    return m;
  }();
  return out;
}

/// Source buffers: parts x tensors, each element = value_of(id, its global index).
std::vector<std::vector<std::vector<std::uint8_t>>> fill(const SavedCheckpoint& ck) {
  const auto& id = ids();
  std::vector<std::vector<std::vector<std::uint8_t>>> out;
  for (const SavedPart& p : ck.parts) {
    auto& bufs = out.emplace_back();
    for (const SavedTensor& t : p.tensors) {
      auto& b = bufs.emplace_back(numel(t.shape) * t.element_size);
      const auto global = global_indices(t.spec);
      for (std::int64_t i = 0; i < numel(t.shape); ++i) {
        store(&b[i * t.element_size], value_of(id.at(t.name), global[i]), t.element_size);
      }
    }
  }
  return out;
}

/// Executes `plan` for `target` and checks that every element of every target
/// tensor is written exactly once, with the right tensor's right element.
void check_plan(const SavedCheckpoint& ck, const TargetRank& target, const RankPlan& plan,
                const std::vector<std::vector<std::vector<std::uint8_t>>>& src,
                const std::string& context) {
  const auto& id = ids();
  ASSERT_EQ(plan.tensors.size(), target.tensors.size()) << context;
  EXPECT_TRUE(plan.missing.empty()) << context;
  for (std::size_t k = 0; k < target.tensors.size(); ++k) {
    const TargetTensor& t = target.tensors[k];
    const TensorPlan& tp = plan.tensors[k];
    const std::string where = context + " target " + std::to_string(target.pp_rank) + "/" +
                              std::to_string(target.tp_rank) + "/" +
                              std::to_string(target.rdp_rank) + " tensor " + t.name;
    ASSERT_EQ(tp.name, t.name) << where;
    ASSERT_TRUE(tp.found) << where;
    const std::int64_t n = numel(t.spec.local_shape());
    const std::size_t es = t.element_size;
    ASSERT_EQ(tp.nbytes, static_cast<std::uint64_t>(n) * es) << where;
    std::vector<std::uint8_t> dst(n * es, 0xAB);
    std::vector<int> written(n, 0);
    std::uint64_t total = 0;
    for (const ReadOp& op : tp.reads) {
      ASSERT_LT(op.part, ck.parts.size()) << where;
      ASSERT_LT(op.tensor, ck.parts[op.part].tensors.size()) << where;
      ASSERT_EQ(ck.parts[op.part].tensors[op.tensor].name, t.name) << where;
      ASSERT_GT(op.bytes(), 0u) << where;
      const auto& buf = src[op.part][op.tensor];
      ASSERT_LE(op.src_end(), buf.size()) << where;
      total += op.bytes();
      for_each_run(op, [&](std::uint64_t s, std::uint64_t d, std::uint64_t len) {
        ASSERT_EQ(s % es, 0u) << where;
        ASSERT_EQ(d % es, 0u) << where;
        ASSERT_EQ(len % es, 0u) << where;
        ASSERT_GE(s, op.src_begin()) << where;
        ASSERT_LE(s + len, op.src_end()) << where;
        ASSERT_LE(s + len, buf.size()) << where;
        ASSERT_LE(d + len, dst.size()) << where;
        std::memcpy(&dst[d], &buf[s], len);
        for (std::uint64_t e = d / es; e < (d + len) / es; ++e) ++written[e];
      });
    }
    EXPECT_EQ(total, tp.nbytes) << where;
    const auto global = global_indices(t.spec);
    const int tid = id.at(t.name);
    for (std::int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(written[i], 1) << where << ": element " << i << " written " << written[i]
                               << " times";
      ASSERT_EQ(load(&dst[i * es], es), value_of(tid, global[i])) << where << ": element " << i;
    }
  }
}

TEST(Planner, EveryPairOfLayoutsCoversEveryElementOnce) {
  const auto layouts = all_layouts();
  ASSERT_EQ(layouts.size(), 24u);
  int pairs = 0;
  for (Mode mode : {Mode::kV2, Mode::kReplicas, Mode::kOwned}) {
    for (const Layout& from : layouts) {
      const SavedCheckpoint ck = save(from, mode);
      const auto src = fill(ck);
      for (const Layout& to : layouts) {
        const std::string context = std::string(str(mode)) + " " + str(from) + " -> " + str(to);
        const auto ts = targets(to);
        LoadPlan all;
        try {
          all = plan_load(ck, ts);
        } catch (const Error& e) {
          FAIL() << context << ": " << e.what();
        }
        ASSERT_EQ(all.ranks.size(), ts.size()) << context;
        EXPECT_TRUE(all.unused.empty()) << context;
        for (std::size_t r = 0; r < ts.size(); ++r) {
          check_plan(ck, ts[r], all.ranks[r], src, context);
          if (HasFatalFailure()) return;
          // Planning one rank alone gives the same plan.
          const RankPlan one = plan_load(ck, ts[r]);
          ASSERT_EQ(one.tensors.size(), all.ranks[r].tensors.size()) << context;
          for (std::size_t k = 0; k < one.tensors.size(); ++k) {
            ASSERT_EQ(one.tensors[k].reads, all.ranks[r].tensors[k].reads) << context;
          }
        }
        ++pairs;
      }
    }
  }
  EXPECT_EQ(pairs, 3 * 24 * 24);
}

// ---- the shape of the copies -------------------------------------------------

/// Executes a group plan: every member's reads, then the chunks' broadcasts
/// (the reader's bytes copied into every other member). Checks that each
/// element of a shared tensor is read by exactly one member, each element of
/// a member's own tensor by that member once, that every member ends with the
/// right values, and that the shared bytes are balanced (each member reads at
/// most its share plus one row).
void check_group(const SavedCheckpoint& ck, const std::vector<TargetRank>& members,
                 const GroupPlan& plan,
                 const std::vector<std::vector<std::vector<std::uint8_t>>>& src,
                 const std::string& context) {
  const auto& id = ids();
  const std::size_t n = members.size();
  ASSERT_EQ(plan.ranks.size(), n) << context;
  ASSERT_EQ(plan.chunk_tensor.size(), n) << context;
  std::vector<std::vector<std::vector<std::uint8_t>>> dst(n);
  std::vector<std::vector<std::vector<int>>> reads(n);  // per member, tensor, element
  for (std::size_t m = 0; m < n; ++m) {
    ASSERT_EQ(plan.ranks[m].tensors.size(), members[m].tensors.size()) << context;
    for (std::size_t k = 0; k < members[m].tensors.size(); ++k) {
      const TargetTensor& t = members[m].tensors[k];
      const std::int64_t e = numel(t.spec.local_shape());
      dst[m].emplace_back(e * t.element_size, 0xAB);
      reads[m].emplace_back(e, 0);
      for (const ReadOp& op : plan.ranks[m].tensors[k].reads) {
        ASSERT_EQ(ck.parts[op.part].tensors[op.tensor].name, t.name) << context;
        const auto& buf = src[op.part][op.tensor];
        ASSERT_LE(op.src_end(), buf.size()) << context;
        const std::size_t es = t.element_size;
        for_each_run(op, [&](std::uint64_t s, std::uint64_t d, std::uint64_t len) {
          ASSERT_LE(d + len, dst[m][k].size()) << context;
          std::memcpy(&dst[m][k][d], &buf[s], len);
          for (std::uint64_t x = d / es; x < (d + len) / es; ++x) ++reads[m][k][x];
        });
      }
    }
  }
  // Shared elements: read by exactly one member; then broadcast.
  std::map<std::pair<std::size_t, std::size_t>, bool> shared;  // (member, tensor)
  std::vector<std::uint64_t> shared_read(n, 0);
  std::uint64_t shared_total = 0, max_row = 0;
  for (std::size_t c = 0; c < plan.chunks.size(); ++c) {
    const SharedChunk& ch = plan.chunks[c];
    ASSERT_GE(ch.reader, 0) << context;
    ASSERT_LT(static_cast<std::size_t>(ch.reader), n) << context;
    ASSERT_LT(ch.row_begin, ch.row_end) << context;
    const std::size_t rk = plan.chunk_tensor[ch.reader][c];
    const TargetTensor& rt = members[ch.reader].tensors[rk];
    ASSERT_EQ(rt.name, ch.name) << context;
    const std::size_t es = rt.element_size;
    ASSERT_LE(ch.byte_end, dst[ch.reader][rk].size()) << context;
    for (std::uint64_t x = ch.byte_begin / es; x < ch.byte_end / es; ++x) {
      int total = 0;
      for (std::size_t m = 0; m < n; ++m) total += reads[m][plan.chunk_tensor[m][c]][x];
      ASSERT_EQ(total, 1) << context << ": shared " << ch.name << " element " << x;
    }
    shared_read[ch.reader] += ch.byte_end - ch.byte_begin;
    shared_total += ch.byte_end - ch.byte_begin;
    max_row = std::max<std::uint64_t>(
        max_row, (ch.byte_end - ch.byte_begin) / static_cast<std::uint64_t>(ch.row_end - ch.row_begin));
    for (std::size_t m = 0; m < n; ++m) {
      const std::size_t k = plan.chunk_tensor[m][c];
      ASSERT_EQ(members[m].tensors[k].name, ch.name) << context;
      shared[{m, k}] = true;
      if (m == static_cast<std::size_t>(ch.reader)) continue;
      std::memcpy(&dst[m][k][ch.byte_begin], &dst[ch.reader][rk][ch.byte_begin],
                  ch.byte_end - ch.byte_begin);
    }
  }
  for (std::size_t m = 0; m < n; ++m) {
    EXPECT_LE(shared_read[m], shared_total / n + max_row + 1) << context << " member " << m;
    for (std::size_t k = 0; k < members[m].tensors.size(); ++k) {
      const TargetTensor& t = members[m].tensors[k];
      const std::size_t es = t.element_size;
      const auto global = global_indices(t.spec);
      for (std::size_t x = 0; x < global.size(); ++x) {
        if (!shared.count({m, k})) {
          ASSERT_EQ(reads[m][k][x], 1) << context << ": own " << t.name << " element " << x;
        }
        ASSERT_EQ(load(&dst[m][k][x * es], es), value_of(id.at(t.name), global[x]))
            << context << " member " << m << " " << t.name << " element " << x;
      }
    }
  }
}

TEST(Planner, GroupsReadEverySharedElementOnce) {
  // Groups of the target layout: rdp replicas (same pp and tp rank), and every
  // rank of one pipeline stage (tp x rdp: only replicated tensors are shared).
  // "owned": each member keeps the odd-numbered tensors it owns (id % rdp),
  // as sharded optimizer state does.
  const auto layouts = all_layouts();
  int groups = 0;
  for (Mode mode : {Mode::kV2, Mode::kOwned}) {
    for (const Layout& from : layouts) {
      const SavedCheckpoint ck = save(from, mode);
      const auto src = fill(ck);
      for (const Layout& to : layouts) {
        for (bool owned : {false, true}) {
          for (bool stage : {false, true}) {
            const std::string context = std::string(str(mode)) + " " + str(from) + " -> " +
                                        str(to) + (owned ? " owned" : "") +
                                        (stage ? " stage group" : " rdp group");
            std::map<std::pair<int, int>, std::vector<TargetRank>> by_group;
            for (TargetRank t : targets(to)) {
              if (owned) {
                std::vector<TargetTensor> kept;
                for (const TargetTensor& x : t.tensors) {
                  const int i = ids().at(x.name);
                  if (i % 2 == 0 || i % to.rdp == t.rdp_rank) kept.push_back(x);
                }
                t.tensors = std::move(kept);
              }
              by_group[{t.pp_rank, stage ? 0 : t.tp_rank}].push_back(std::move(t));
            }
            for (const auto& [key, members] : by_group) {
              GroupPlan plan;
              try {
                plan = plan_group(ck, members);
              } catch (const Error& e) {
                FAIL() << context << ": " << e.what();
              }
              check_group(ck, members, plan, src, context);
              if (HasFatalFailure()) return;
              // Deterministic: planning again gives the same chunks and reads.
              const GroupPlan again = plan_group(ck, members);
              ASSERT_EQ(again.chunks.size(), plan.chunks.size()) << context;
              for (std::size_t c = 0; c < plan.chunks.size(); ++c) {
                EXPECT_EQ(again.chunks[c].reader, plan.chunks[c].reader) << context;
                EXPECT_EQ(again.chunks[c].row_begin, plan.chunks[c].row_begin) << context;
              }
              if (members.size() == 1) {
                // One member: the same plan as plan_load.
                const RankPlan one = plan_load(ck, members[0]);
                for (std::size_t k = 0; k < one.tensors.size(); ++k) {
                  ASSERT_EQ(one.tensors[k].reads, plan.ranks[0].tensors[k].reads) << context;
                }
                EXPECT_TRUE(plan.chunks.empty()) << context;
              } else if (!owned && !stage) {
                EXPECT_FALSE(plan.chunks.empty()) << context;
              }
              ++groups;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(groups, 0);
}

TEST(Planner, GroupOfFourReplicasSplitsTheBytes) {
  // pp1 x tp1 x rdp4 loading a pp2 x tp2 save: each replica reads a quarter.
  const SavedCheckpoint ck = save({2, 2, 1}, Mode::kV2);
  const auto members = targets({1, 1, 4});
  const GroupPlan plan = plan_group(ck, members);
  std::vector<std::uint64_t> bytes(4, 0);
  std::uint64_t total = 0;
  for (std::size_t m = 0; m < 4; ++m) {
    for (const TensorPlan& t : plan.ranks[m].tensors) {
      for (const ReadOp& op : t.reads) bytes[m] += op.bytes();
    }
  }
  for (const TensorPlan& t : plan_load(ck, members[0]).tensors) total += t.nbytes;
  EXPECT_EQ(bytes[0] + bytes[1] + bytes[2] + bytes[3], total);
  for (std::uint64_t b : bytes) {
    EXPECT_GT(b, total / 8);
    EXPECT_LT(b, total / 2);
  }
}

SavedCheckpoint one_tensor(const Shape& shape, int dim, int shards, std::size_t es = 4) {
  SavedCheckpoint ck;
  ck.tp_size = shards;
  for (int i = 0; i < shards; ++i) {
    SavedPart p;
    p.file = "ckpt_0_" + std::to_string(i);
    p.tp_rank = i;
    SavedTensor t;
    t.name = "w";
    t.dtype = dtype_of(es);
    t.element_size = es;
    t.spec = spec_of(shape, dim, shards, i);
    t.shape = t.spec.local_shape();
    p.tensors.push_back(t);
    ck.parts.push_back(p);
  }
  return ck;
}

TargetRank want(const Shape& shape, int dim, int shards, int index, std::size_t es = 4) {
  TargetRank t;
  t.tp_rank = index;
  t.tensors.push_back({"w", dtype_of(es), es, spec_of(shape, dim, shards, index)});
  return t;
}

TEST(Planner, RowSplitsAreSingleRuns) {
  // [1000, 64] saved over 4 row shards, loaded over 2: each target shard is
  // two contiguous runs, one per source file.
  const RankPlan p = plan_load(one_tensor({1000, 64}, 0, 4), want({1000, 64}, 0, 2, 1));
  ASSERT_EQ(p.tensors[0].reads.size(), 2u);
  const ReadOp& a = p.tensors[0].reads[0];
  const ReadOp& b = p.tensors[0].reads[1];
  EXPECT_EQ(a.part, 2u);
  EXPECT_EQ(b.part, 3u);
  EXPECT_TRUE(a.loops.empty());
  EXPECT_TRUE(b.loops.empty());
  EXPECT_EQ(a.src_offset, 0u);
  EXPECT_EQ(a.dst_offset, 0u);
  EXPECT_EQ(a.run_bytes, 250u * 64 * 4);
  EXPECT_EQ(b.dst_offset, 250u * 64 * 4);
}

TEST(Planner, ColumnSplitsAreOneLoopOfRuns) {
  // [1000, 64] saved over 2 column shards, loaded replicated: one loop of
  // 1000 rows per source, 32 elements per run.
  const RankPlan p = plan_load(one_tensor({1000, 64}, 1, 2), want({1000, 64}, -1, 1, 0));
  ASSERT_EQ(p.tensors[0].reads.size(), 2u);
  const ReadOp& b = p.tensors[0].reads[1];
  EXPECT_EQ(b.part, 1u);
  EXPECT_EQ(b.run_bytes, 32u * 4);
  ASSERT_EQ(b.loops.size(), 1u);
  EXPECT_EQ(b.loops[0], (RunLoop{1000, 32 * 4, 64 * 4}));
  EXPECT_EQ(b.src_offset, 0u);
  EXPECT_EQ(b.dst_offset, 32u * 4);
  EXPECT_EQ(b.src_end(), 1000u * 32 * 4);

  // Inner split of a 3-D tensor: the outer dimensions merge into one loop.
  const RankPlan q = plan_load(one_tensor({6, 5, 8}, 2, 2), want({6, 5, 8}, 2, 4, 3));
  ASSERT_EQ(q.tensors[0].reads.size(), 1u);
  EXPECT_EQ(q.tensors[0].reads[0].loops, (std::vector<RunLoop>{{30, 4 * 4, 2 * 4}}));
  EXPECT_EQ(q.tensors[0].reads[0].run_bytes, 2u * 4);

  // Same split dim and count: one run of the whole shard.
  const RankPlan r = plan_load(one_tensor({6, 5, 8}, 1, 2), want({6, 5, 8}, 1, 2, 1));
  ASSERT_EQ(r.tensors[0].reads.size(), 1u);
  EXPECT_TRUE(r.tensors[0].reads[0].loops.empty());
  EXPECT_EQ(r.tensors[0].reads[0].run_bytes, 6u * 2 * 8 * 4);
}

TEST(Planner, ChangingSplitDimensionNeedsAtMostTwoLoops) {
  // [4, 6, 10] saved split on dim 1 (3 shards), loaded split on dim 2 (2):
  // rows of dim 0 and dim 1 do not merge.
  const RankPlan p = plan_load(one_tensor({4, 6, 10}, 1, 3), want({4, 6, 10}, 2, 2, 1));
  ASSERT_EQ(p.tensors[0].reads.size(), 3u);
  const ReadOp& op = p.tensors[0].reads[1];
  EXPECT_EQ(op.run_bytes, 5u * 4);
  EXPECT_EQ(op.loops, (std::vector<RunLoop>{{4, 2 * 10 * 4, 6 * 5 * 4}, {2, 10 * 4, 5 * 4}}));
  EXPECT_EQ(op.src_offset, 5u * 4);
  EXPECT_EQ(op.dst_offset, 2u * 5 * 4);
}

TEST(Planner, ScalarsAndEmptyTensors) {
  const RankPlan p = plan_load(one_tensor({}, -1, 2, 8), want({}, -1, 1, 0, 8));
  ASSERT_EQ(p.tensors[0].reads.size(), 1u);
  EXPECT_EQ(p.tensors[0].reads[0].run_bytes, 8u);
  EXPECT_TRUE(p.tensors[0].reads[0].loops.empty());
  const RankPlan e = plan_load(one_tensor({0, 3}, 0, 2), want({0, 3}, 0, 4, 3));
  EXPECT_TRUE(e.tensors[0].reads.empty());
  EXPECT_EQ(e.tensors[0].nbytes, 0u);
}

TEST(Planner, ReplicasSpreadOverFiles) {
  // A replicated tensor saved by tp 0 and 1 of one stage, rdp 0 and 1 (v3
  // replicas): each target rank reads the file of its own tp and rdp rank,
  // and ranks beyond the saved ones wrap around.
  const SavedCheckpoint ck = save({1, 2, 2}, Mode::kReplicas);
  auto file_read = [&](int tp, int rdp, const std::string& name) {
    TargetRank t;
    t.tp_rank = tp;
    t.rdp_rank = rdp;
    t.tensors.push_back({name, "bfloat16", 2, ShardSpec::replicated({6})});
    const RankPlan p = plan_load(ck, t);
    EXPECT_EQ(p.tensors[0].reads.size(), 1u);
    return ck.parts[p.tensors[0].reads[0].part].file;
  };
  EXPECT_EQ(file_read(0, 0, "layers.0.norm.weight"), "ckpt_0_0_0");
  EXPECT_EQ(file_read(1, 0, "layers.0.norm.weight"), "ckpt_0_1_0");
  EXPECT_EQ(file_read(1, 1, "layers.0.norm.weight"), "ckpt_0_1_1");
  EXPECT_EQ(file_read(3, 2, "layers.0.norm.weight"), "ckpt_0_1_0");
  EXPECT_EQ(file_read(2, 3, "layers.0.norm.weight"), "ckpt_0_0_1");

  // Over every rank of tp4 x rdp2, both rdp replicas of a file are read as
  // much (parts are ordered pp, tp, rdp).
  ASSERT_EQ(ck.parts.size(), 4u);
  std::vector<std::uint64_t> bytes(ck.parts.size(), 0);
  for (const TargetRank& t : targets({1, 4, 2})) {
    const auto b = plan_load(ck, t).bytes_by_part(ck.parts.size());
    for (std::size_t i = 0; i < b.size(); ++i) bytes[i] += b[i];
  }
  EXPECT_GT(bytes[0], 0u);
  EXPECT_GT(bytes[2], 0u);
  EXPECT_EQ(bytes[1], bytes[0]);
  EXPECT_EQ(bytes[3], bytes[2]);
}

TEST(Planner, SplitsAreReadFromTheirOwnFilesFirst) {
  // A checkpoint holding a tensor both replicated (full save) and split: a
  // split target of the same layout reads its own shard's file.
  SavedCheckpoint ck = one_tensor({8, 4}, 0, 2);
  SavedPart full;
  full.file = "full";
  SavedTensor t = ck.parts[0].tensors[0];
  t.spec = ShardSpec::replicated({8, 4});
  t.shape = {8, 4};
  full.tensors.push_back(t);
  ck.parts.insert(ck.parts.begin(), full);
  const RankPlan p = plan_load(ck, want({8, 4}, 0, 2, 1));
  ASSERT_EQ(p.tensors[0].reads.size(), 1u);
  EXPECT_EQ(ck.parts[p.tensors[0].reads[0].part].file, "ckpt_0_1");
  // Another split reads the replicated copy: one op.
  const RankPlan q = plan_load(ck, want({8, 4}, 1, 4, 1));
  ASSERT_EQ(q.tensors[0].reads.size(), 1u);
  EXPECT_EQ(ck.parts[q.tensors[0].reads[0].part].file, "full");
}

// ---- errors -----------------------------------------------------------------

TEST(Planner, MissingFileNamesTensorRangeAndPart) {
  SavedCheckpoint ck = save({1, 2, 1}, Mode::kV2);
  ck.parts.erase(ck.parts.begin() + 1);  // ckpt_0_1 lost
  const std::string msg =
      test::error_of<CheckpointError>([&] { plan_load(ck, targets({1, 1, 1})); });
  EXPECT_NE(msg.find("tensor 'embed.vocab' of target rank (pp_rank 0, tp_rank 0, rdp_rank 0)"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("needs elements [5, 10) along dim 0 of global shape [10, 6] (saved shard 1 "
                     "of 2)"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("the part of pp_rank 0, tp_rank 1, which is not among the checkpoint's 1 "
                     "files"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("'ckpt_0_0' (pp_rank 0, tp_rank 0)"), std::string::npos) << msg;
}

TEST(Planner, TensorMissingFromItsFileNamesTheFile) {
  SavedCheckpoint ck = save({2, 2, 1}, Mode::kV2);
  // ckpt_1_1 lacks head.weight (split on dim 2: [9, 5, 3] -> tp 1 has column 2).
  auto& part = ck.parts[3];
  ASSERT_EQ(part.file, "ckpt_1_1");
  for (auto it = part.tensors.begin(); it != part.tensors.end(); ++it) {
    if (it->name == "head.weight") {
      part.tensors.erase(it);
      break;
    }
  }
  TargetRank t;
  t.tensors.push_back({"head.weight", "float32", 4, ShardSpec::replicated({9, 5, 3})});
  const std::string msg = test::error_of<CheckpointError>([&] { plan_load(ck, t); });
  EXPECT_NE(msg.find("tensor 'head.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("elements [2, 3) along dim 2 of global shape [9, 5, 3]"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("it belongs in 'ckpt_1_1' (pp_rank 1, tp_rank 1), which does not hold it"),
            std::string::npos)
      << msg;
  // A target that needs only the other shard plans fine.
  TargetRank lower;
  lower.tensors.push_back({"head.weight", "float32", 4, ShardSpec::split({9, 5, 3}, 2, 2, 0)});
  EXPECT_NO_THROW(plan_load(ck, lower));
}

TEST(Planner, UnknownTensor) {
  const SavedCheckpoint ck = save({2, 1, 1}, Mode::kV2);
  TargetRank t;
  t.pp_rank = 1;
  t.tensors.push_back({"layers.9.fc.weight", "float32", 4, ShardSpec::replicated({10, 6})});
  t.tensors.push_back({"head.weight", "float32", 4, ShardSpec::replicated({9, 5, 3})});
  const std::string msg = test::error_of<CheckpointError>([&] { plan_load(ck, t); });
  EXPECT_NE(msg.find("tensor 'layers.9.fc.weight' of target rank (pp_rank 1, tp_rank 0, rdp_rank "
                     "0) is in no file of the checkpoint (2 part files, saved with "
                     "pipeline_parallel_degree 2, tensor_parallel_degree 1, rdp_size 1)"),
            std::string::npos)
      << msg;

  PlanOptions lenient;
  lenient.allow_missing = true;
  const LoadPlan p = plan_load(ck, std::vector<TargetRank>{t}, lenient);
  EXPECT_EQ(p.ranks[0].missing, std::vector<std::string>{"layers.9.fc.weight"});
  EXPECT_FALSE(p.ranks[0].tensors[0].found);
  EXPECT_TRUE(p.ranks[0].tensors[1].found);
  EXPECT_EQ(p.ranks[0].tensors[1].reads.size(), 1u);
  // Everything else the checkpoint holds is reported unused.
  EXPECT_EQ(p.unused.size(), model().size() - 1);
}

TEST(Planner, GlobalShapeAndDtypeMismatchNameBoth) {
  const SavedCheckpoint ck = save({1, 2, 1}, Mode::kV2);
  TargetRank t;
  t.tensors.push_back({"embed.vocab", "float32", 4, ShardSpec::split({12, 6}, 0, 2, 0)});
  std::string msg = test::error_of<CheckpointError>([&] { plan_load(ck, t); });
  EXPECT_NE(msg.find("tensor 'embed.vocab' of target rank (pp_rank 0, tp_rank 0, rdp_rank 0) has "
                     "global shape [12, 6] but the checkpoint holds [10, 6] ('ckpt_0_0' "
                     "(pp_rank 0, tp_rank 0))"),
            std::string::npos)
      << msg;

  t.tensors[0] = {"embed.vocab", "bfloat16", 2, ShardSpec::split({10, 6}, 0, 2, 0)};
  msg = test::error_of<CheckpointError>([&] { plan_load(ck, t); });
  EXPECT_NE(msg.find("has dtype bfloat16 (2 bytes) but the checkpoint holds float32 (4 bytes) in "
                     "'ckpt_0_0'"),
            std::string::npos)
      << msg;
}

TEST(Planner, InconsistentCheckpointNamesBothFiles) {
  SavedCheckpoint ck = save({1, 2, 1}, Mode::kV2);
  SavedTensor& t = ck.parts[1].tensors[0];
  ASSERT_EQ(t.name, "embed.vocab");
  t.spec = ShardSpec::split({12, 6}, 0, 2, 1);
  t.shape = t.spec.local_shape();
  std::string msg = test::error_of<CheckpointError>([&] { plan_load(ck, targets({1, 1, 1})); });
  EXPECT_NE(msg.find("saved tensor 'embed.vocab' has global shape [10, 6] and dtype float32 in "
                     "'ckpt_0_0' (pp_rank 0, tp_rank 0) but global shape [12, 6] and dtype "
                     "float32 in 'ckpt_0_1' (pp_rank 0, tp_rank 1)"),
            std::string::npos)
      << msg;

  ck = save({1, 2, 1}, Mode::kV2);
  ck.parts[1].tensors[0].shape = {4, 6};
  msg = test::error_of<CheckpointError>([&] { plan_load(ck, targets({1, 1, 1})); });
  EXPECT_NE(msg.find("saved tensor 'embed.vocab' in 'ckpt_0_1' (pp_rank 0, tp_rank 1) is stored "
                     "with shape [4, 6] but its shard spec [10, 6] split dim 0 shard 1/2 (offset "
                     "5, size 5) gives [5, 6]"),
            std::string::npos)
      << msg;
}

}  // namespace
}  // namespace ckpt
}  // namespace smp
