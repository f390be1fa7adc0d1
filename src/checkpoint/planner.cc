#include "smp/checkpoint/planner.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "smp/core/error.h"

namespace smp {
namespace ckpt {

std::int64_t ReadOp::runs() const {
  std::int64_t n = 1;
  for (const RunLoop& l : loops) n *= l.count;
  return n;
}

std::uint64_t ReadOp::bytes() const { return static_cast<std::uint64_t>(runs()) * run_bytes; }

std::uint64_t ReadOp::src_end() const {
  if (runs() == 0 || run_bytes == 0) return src_offset;
  std::uint64_t end = src_offset + run_bytes;
  for (const RunLoop& l : loops) end += static_cast<std::uint64_t>((l.count - 1) * l.src_stride);
  return end;
}

bool ReadOp::operator==(const ReadOp& o) const {
  return part == o.part && tensor == o.tensor && src_offset == o.src_offset &&
         dst_offset == o.dst_offset && run_bytes == o.run_bytes && loops == o.loops;
}

std::vector<std::uint64_t> RankPlan::bytes_by_part(std::size_t num_parts) const {
  std::vector<std::uint64_t> out(num_parts, 0);
  for (const TensorPlan& t : tensors) {
    for (const ReadOp& op : t.reads) {
      if (op.part < num_parts) out[op.part] += op.bytes();
    }
  }
  return out;
}

namespace {

using Shape = std::vector<std::int64_t>;

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  return out + "]";
}

std::string rank_str(int pp, int tp, int rdp) {
  std::string s = detail::str("pp_rank ", pp, ", tp_rank ", tp);
  if (rdp >= 0) s += detail::str(", rdp_rank ", rdp);
  return s;
}

std::string part_str(const SavedPart& p) {
  return detail::str("'", p.file, "' (", rank_str(p.pp_rank, p.tp_rank, p.rdp_rank), ")");
}

std::string target_str(const TargetRank& t) {
  return detail::str("target rank (", rank_str(t.pp_rank, t.tp_rank, t.rdp_rank), ")");
}

/// (split_dim, num_shards); (-1, 1) for every replicated spec.
using LayoutKey = std::pair<int, int>;

LayoutKey layout_of(const ShardSpec& s) {
  return s.is_replicated() ? LayoutKey{-1, 1} : LayoutKey{s.split_dim, s.num_shards};
}

int shard_of(const ShardSpec& s) { return s.is_replicated() ? 0 : s.shard_index; }

/// Global element box [lo, hi) of a shard.
struct Box {
  Shape lo, hi;
  bool empty() const {
    for (std::size_t d = 0; d < lo.size(); ++d) {
      if (hi[d] <= lo[d]) return true;
    }
    return false;
  }
};

Box box_of(const ShardSpec& s) {
  Box b;
  b.lo.assign(s.global_shape.size(), 0);
  b.hi = s.global_shape;
  if (!s.is_replicated()) {
    b.lo[s.split_dim] = s.offset();
    b.hi[s.split_dim] = b.lo[s.split_dim] + s.local_shape()[s.split_dim];
  }
  return b;
}

Box intersect(const Box& a, const Box& b) {
  Box r = a;
  for (std::size_t d = 0; d < a.lo.size(); ++d) {
    r.lo[d] = std::max(a.lo[d], b.lo[d]);
    r.hi[d] = std::min(a.hi[d], b.hi[d]);
  }
  return r;
}

Shape row_major_strides(const Shape& extent) {
  Shape st(extent.size(), 1);
  for (std::size_t d = extent.size(); d > 1; --d) st[d - 2] = st[d - 1] * extent[d - 1];
  return st;
}

/// The ReadOp copying box `piece` from a tensor stored as box `src` into one
/// stored as box `dst` (both row-major over their own extents).
ReadOp box_copy(const Box& piece, const Box& src, const Box& dst, std::size_t element_size) {
  const std::size_t n = piece.lo.size();
  Shape src_ext(n), dst_ext(n);
  for (std::size_t d = 0; d < n; ++d) {
    src_ext[d] = src.hi[d] - src.lo[d];
    dst_ext[d] = dst.hi[d] - dst.lo[d];
  }
  const Shape ss = row_major_strides(src_ext), ds = row_major_strides(dst_ext);
  std::int64_t src_off = 0, dst_off = 0;
  std::vector<RunLoop> dims;  // outer first, strides in elements
  for (std::size_t d = 0; d < n; ++d) {
    src_off += (piece.lo[d] - src.lo[d]) * ss[d];
    dst_off += (piece.lo[d] - dst.lo[d]) * ds[d];
    const std::int64_t extent = piece.hi[d] - piece.lo[d];
    if (extent != 1) dims.push_back({extent, ss[d], ds[d]});
  }
  // Innermost dimensions that are dense in both tensors form the run.
  std::int64_t run = 1;
  while (!dims.empty() && dims.back().src_stride == run && dims.back().dst_stride == run) {
    run *= dims.back().count;
    dims.pop_back();
  }
  // Merge an outer loop into the next inner one when it continues it exactly.
  std::vector<RunLoop> loops;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    if (!loops.empty()) {
      RunLoop& inner = loops.back();
      if (it->src_stride == inner.src_stride * inner.count &&
          it->dst_stride == inner.dst_stride * inner.count) {
        inner.count *= it->count;
        continue;
      }
    }
    loops.push_back(*it);
  }
  std::reverse(loops.begin(), loops.end());
  const auto es = static_cast<std::int64_t>(element_size);
  ReadOp op;
  op.src_offset = static_cast<std::uint64_t>(src_off * es);
  op.dst_offset = static_cast<std::uint64_t>(dst_off * es);
  op.run_bytes = static_cast<std::uint64_t>(run * es);
  for (RunLoop& l : loops) {
    l.src_stride *= es;
    l.dst_stride *= es;
  }
  op.loops = std::move(loops);
  return op;
}

/// Throws unless `s` is a well-formed spec whose local shape is `shape`
/// (`shape` null: not checked). `where()` names the tensor and its holder
/// (built only for a message).
template <typename Where>
void check_spec(const ShardSpec& s, const Shape* shape, std::size_t element_size,
                const Where& where) {
  const int ndim = static_cast<int>(s.global_shape.size());
  for (std::int64_t e : s.global_shape) {
    SMP_CHECK(e >= 0, CheckpointError, where(), " has a negative extent in its global shape ",
              shape_str(s.global_shape));
  }
  SMP_CHECK(element_size > 0, CheckpointError, where(), " has element size 0");
  if (!s.is_replicated()) {
    SMP_CHECK(s.split_dim >= 0 && s.split_dim < ndim && s.shard_index >= 0 &&
                  s.shard_index < s.num_shards,
              CheckpointError, where(), " has an invalid shard spec: split dim ", s.split_dim,
              ", shard ", s.shard_index, " of ", s.num_shards, " for global shape ",
              shape_str(s.global_shape));
  }
  if (shape != nullptr) {
    SMP_CHECK(*shape == s.local_shape(), CheckpointError, where(), " is stored with shape ",
              shape_str(*shape), " but its shard spec ", s.describe(), " gives ",
              shape_str(s.local_shape()), "; the file's index is inconsistent");
  }
}

struct Copy {
  std::size_t part, tensor;
};

/// Every copy of one saved name, grouped by split and shard.
struct Entry {
  std::vector<Copy> copies;
  /// layout -> shard index -> replicas (in part order).
  std::map<LayoutKey, std::map<int, std::vector<Copy>>> layouts;
};

class Planner {
 public:
  Planner(const SavedCheckpoint& saved, const PlanOptions& options)
      : saved_(saved), options_(options) {
    for (std::size_t p = 0; p < saved.parts.size(); ++p) {
      const SavedPart& part = saved.parts[p];
      for (std::size_t t = 0; t < part.tensors.size(); ++t) {
        const SavedTensor& st = part.tensors[t];
        check_spec(st.spec, &st.shape, st.element_size, [&] {
          return detail::str("saved tensor '", st.name, "' in ", part_str(part));
        });
        Entry& e = entries_[st.name];
        if (!e.copies.empty()) {
          const Copy first = e.copies.front();
          const SavedTensor& ft = tensor(first);
          SMP_CHECK(ft.spec.global_shape == st.spec.global_shape && ft.dtype == st.dtype &&
                        ft.element_size == st.element_size,
                    CheckpointError, "saved tensor '", st.name, "' has global shape ",
                    shape_str(ft.spec.global_shape), " and dtype ", ft.dtype, " in ",
                    part_str(saved.parts[first.part]), " but global shape ",
                    shape_str(st.spec.global_shape), " and dtype ", st.dtype, " in ",
                    part_str(part),
                    "; the files come from different models. Restore the checkpoint from one "
                    "save");
        }
        e.copies.push_back({p, t});
        e.layouts[layout_of(st.spec)][shard_of(st.spec)].push_back({p, t});
      }
    }
  }

  const std::map<std::string, Entry>& entries() const { return entries_; }
  bool holds(const std::string& name) const { return entries_.count(name) != 0; }
  TensorPlan plan_rows(const TargetRank& target, const TargetTensor& t, std::int64_t row_begin,
                       std::int64_t row_end) const {
    RankPlan unused;
    return plan_tensor(target, t, unused, row_begin, row_end);
  }

  RankPlan plan(const TargetRank& target) const {
    RankPlan out;
    out.pp_rank = target.pp_rank;
    out.tp_rank = target.tp_rank;
    out.rdp_rank = target.rdp_rank;
    out.tensors.reserve(target.tensors.size());
    for (const TargetTensor& t : target.tensors) out.tensors.push_back(plan_tensor(target, t, out));
    return out;
  }

 private:
  const SavedTensor& tensor(const Copy& c) const { return saved_.parts[c.part].tensors[c.tensor]; }
  const SavedPart& part(const Copy& c) const { return saved_.parts[c.part]; }

  /// Plans rows [row_begin, row_end) along dim 0 of `t` (row_end < 0: every
  /// row); destination offsets stay those of the whole local tensor.
  TensorPlan plan_tensor(const TargetRank& target, const TargetTensor& t, RankPlan& out,
                         std::int64_t row_begin = 0, std::int64_t row_end = -1) const {
    auto where = [&] { return detail::str("tensor '", t.name, "' of ", target_str(target)); };
    check_spec(t.spec, nullptr, t.element_size, where);
    TensorPlan tp;
    tp.name = t.name;
    std::int64_t numel = 1;
    for (std::int64_t e : t.spec.local_shape()) numel *= e;
    tp.nbytes = static_cast<std::uint64_t>(numel) * t.element_size;

    auto it = entries_.find(t.name);
    if (it == entries_.end()) {
      if (options_.allow_missing) {
        tp.found = false;
        out.missing.push_back(t.name);
        return tp;
      }
      SMP_THROW(CheckpointError, where(), " is in no file of the checkpoint (", saved_.parts.size(),
                " part files, saved with pipeline_parallel_degree ", saved_.pp_size,
                ", tensor_parallel_degree ", saved_.tp_size, ", rdp_size ", saved_.rdp_size,
                "); the model or optimizer differs from the one that was saved. Load with "
                "strict=False to skip it");
    }
    const Entry& e = it->second;
    const SavedTensor& ref = tensor(e.copies.front());
    SMP_CHECK(ref.spec.global_shape == t.spec.global_shape, CheckpointError, where(),
              " has global shape ", shape_str(t.spec.global_shape), " but the checkpoint holds ",
              shape_str(ref.spec.global_shape), " (", part_str(part(e.copies.front())),
              "); the model differs from the one that was saved");
    SMP_CHECK(ref.dtype == t.dtype && ref.element_size == t.element_size, CheckpointError, where(),
              " has dtype ", t.dtype, " (", t.element_size, " bytes) but the checkpoint holds ",
              ref.dtype, " (", ref.element_size, " bytes) in ", part_str(part(e.copies.front())),
              "; convert the model to the saved dtype before loading, then cast");
    const Box full = box_of(t.spec);
    if (full.empty()) return tp;
    Box want = full;
    if (row_end >= 0 && !want.lo.empty()) {
      want.lo[0] = full.lo[0] + row_begin;
      want.hi[0] = full.lo[0] + row_end;
      if (want.empty()) return tp;
    }

    // Candidate splits of the saved tensor, best first; the first one whose
    // shards cover `want` is used.
    struct Candidate {
      std::tuple<int, int, int, int, int> rank;
      LayoutKey key;
      std::vector<int> needed, missing;
    };
    std::vector<Candidate> cands;
    const LayoutKey target_key = layout_of(t.spec);
    for (const auto& [key, shards] : e.layouts) {
      Candidate c;
      c.key = key;
      const int count = key.first < 0 ? 1 : key.second;
      for (int i = 0; i < count; ++i) {
        if (key.first >= 0) {
          const Box b = box_of(ShardSpec::split(t.spec.global_shape, key.first, key.second, i));
          if (intersect(b, want).empty()) continue;
        }
        c.needed.push_back(i);
        if (shards.count(i) == 0) c.missing.push_back(i);
      }
      c.rank = {c.missing.empty() ? 0 : 1, key == target_key ? 0 : 1, key.first < 0 ? 0 : 1,
                key.first == target_key.first ? 0 : 1, key.first};
      cands.push_back(std::move(c));
    }
    std::sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& b) {
      return std::tie(a.rank, a.key) < std::tie(b.rank, b.key);
    });
    const Candidate& best = cands.front();
    if (!best.missing.empty()) throw_missing(target, t, e, best.key, best.missing.front());

    const auto& shards = e.layouts.at(best.key);
    for (int i : best.needed) {
      const Copy c = choose(shards.at(i), target);
      const SavedTensor& src = tensor(c);
      const Box have = box_of(src.spec);
      const Box piece = intersect(have, want);
      if (piece.empty()) continue;
      ReadOp op = box_copy(piece, have, full, t.element_size);
      op.part = c.part;
      op.tensor = c.tensor;
      tp.reads.push_back(std::move(op));
    }
    return tp;
  }

  /// The replica a target rank reads: same tp rank if one has it, else the
  /// (target tp mod distinct tp ranks)-th; then likewise for pp and rdp; then
  /// the lowest file name. Targets of different ranks spread over replicas.
  Copy choose(const std::vector<Copy>& replicas, const TargetRank& target) const {
    std::vector<Copy> set = replicas;
    auto narrow = [&](auto coord, int want) {
      std::set<int> values;
      for (const Copy& c : set) values.insert(coord(part(c)));
      int pick = want;
      if (values.count(want) == 0) {
        const int k = static_cast<int>(values.size());
        pick = *std::next(values.begin(), ((want % k) + k) % k);
      }
      std::vector<Copy> kept;
      for (const Copy& c : set) {
        if (coord(part(c)) == pick) kept.push_back(c);
      }
      set = std::move(kept);
    };
    narrow([](const SavedPart& p) { return p.tp_rank; }, target.tp_rank);
    narrow([](const SavedPart& p) { return p.pp_rank; }, target.pp_rank);
    narrow([](const SavedPart& p) { return p.rdp_rank; }, target.rdp_rank);
    return *std::min_element(set.begin(), set.end(), [&](const Copy& a, const Copy& b) {
      return std::tie(part(a).file, a.part, a.tensor) < std::tie(part(b).file, b.part, b.tensor);
    });
  }

  [[noreturn]] void throw_missing(const TargetRank& target, const TargetTensor& t,
                                  const Entry& e, const LayoutKey& key, int shard) const {
    const ShardSpec missing =
        ShardSpec::split(t.spec.global_shape, key.first, key.second, shard);
    const Box range = intersect(box_of(missing), box_of(t.spec));
    const int d = key.first;
    // Who should have held it: the part of the holders' pipeline stage whose
    // tp rank is the shard index (tensor-parallel splits are by tp rank).
    std::set<int> pps;
    std::vector<std::string> holders;
    for (const auto& [i, replicas] : e.layouts.at(key)) {
      for (const Copy& c : replicas) {
        pps.insert(part(c).pp_rank);
        holders.push_back(part_str(part(c)));
      }
    }
    std::string expected;
    if (key.second == saved_.tp_size) {
      std::vector<std::string> listed;
      for (const SavedPart& p : saved_.parts) {
        if (pps.count(p.pp_rank) != 0 && p.tp_rank == shard) listed.push_back(part_str(p));
      }
      if (!listed.empty()) {
        expected = "it belongs in ";
        for (std::size_t i = 0; i < listed.size(); ++i) expected += (i ? " or " : "") + listed[i];
        expected += listed.size() == 1 ? ", which does not hold it" : ", none of which holds it";
      } else {
        expected = detail::str("it belongs in the part of pp_rank ", *pps.begin(), ", tp_rank ",
                               shard, ", which is not among the checkpoint's ",
                               saved_.parts.size(), " files");
      }
    } else {
      expected = detail::str("it belongs in the part holding shard ", shard, " of ", key.second);
    }
    std::string have;
    for (std::size_t i = 0; i < holders.size(); ++i) have += (i ? ", " : "") + holders[i];
    SMP_THROW(CheckpointError, "tensor '", t.name, "' of ", target_str(target),
              " needs elements [", range.lo[d], ", ", range.hi[d], ") along dim ", d,
              " of global shape ", shape_str(t.spec.global_shape), " (saved shard ", shard, " of ",
              key.second, "), which no file of the checkpoint holds: ", expected,
              ". The other shards are in ", have,
              ". Restore the missing file or save the checkpoint again");
  }

  const SavedCheckpoint& saved_;
  PlanOptions options_;
  std::map<std::string, Entry> entries_;
};

/// What makes two members' tensors the same bytes.
using SameKey = std::tuple<std::string, std::string, std::size_t, Shape, int, int, int>;

SameKey same_key(const TargetTensor& t) {
  const LayoutKey k = layout_of(t.spec);
  return {t.name, t.dtype, t.element_size, t.spec.global_shape, k.first, k.second,
          shard_of(t.spec)};
}

}  // namespace

GroupPlan plan_group(const SavedCheckpoint& saved, const std::vector<TargetRank>& members,
                     const PlanOptions& options) {
  Planner planner(saved, options);
  GroupPlan out;
  const std::size_t n = members.size();
  out.chunk_tensor.resize(n);
  // Shared tensors: needed by every member with the same key (first
  // occurrence of a key in each member).
  std::vector<std::map<SameKey, std::size_t>> index(n);
  for (std::size_t m = 0; m < n; ++m) {
    for (std::size_t i = 0; i < members[m].tensors.size(); ++i) {
      index[m].emplace(same_key(members[m].tensors[i]), i);
    }
  }
  struct Shared {
    std::size_t tensor;  // in members[0]
    std::uint64_t nbytes, row_bytes;
    std::int64_t rows;
  };
  std::vector<Shared> shared;
  std::vector<std::set<std::size_t>> is_shared(n);
  std::uint64_t total = 0;
  if (n > 1) {
    for (std::size_t i = 0; i < members[0].tensors.size(); ++i) {
      const TargetTensor& t = members[0].tensors[i];
      const SameKey key = same_key(t);
      if (index[0].at(key) != i || !planner.holds(t.name)) continue;
      bool everywhere = true;
      for (std::size_t m = 1; m < n && everywhere; ++m) everywhere = index[m].count(key) != 0;
      if (!everywhere) continue;
      const Shape ls = t.spec.local_shape();
      std::int64_t numel = 1;
      for (std::int64_t e : ls) numel *= e;
      const std::uint64_t nbytes = static_cast<std::uint64_t>(numel) * t.element_size;
      if (nbytes == 0) continue;  // nothing to read or send
      const std::int64_t rows = ls.empty() ? 1 : ls[0];
      shared.push_back({i, nbytes, nbytes / static_cast<std::uint64_t>(rows), rows});
      for (std::size_t m = 0; m < n; ++m) is_shared[m].insert(index[m].at(key));
      total += nbytes;
    }
  }
  // Member k reads the rows starting in bytes [k * total / n, (k + 1) * total / n)
  // of the shared tensors laid end to end.
  std::uint64_t base = 0;
  for (const Shared& s : shared) {
    const TargetTensor& t = members[0].tensors[s.tensor];
    std::int64_t row = 0;
    while (row < s.rows) {
      const auto start = static_cast<unsigned __int128>(base + row * s.row_bytes);
      const int reader = static_cast<int>(start * n / total);
      // First row whose start belongs to the next reader.
      const auto limit = (static_cast<unsigned __int128>(reader) + 1) * total;
      std::int64_t end = row + 1;
      while (end < s.rows &&
             static_cast<unsigned __int128>(base + end * s.row_bytes) * n < limit) {
        ++end;
      }
      SharedChunk c;
      c.name = t.name;
      c.row_begin = row;
      c.row_end = end;
      c.byte_begin = static_cast<std::uint64_t>(row) * s.row_bytes;
      c.byte_end = static_cast<std::uint64_t>(end) * s.row_bytes;
      c.reader = reader;
      out.chunks.push_back(std::move(c));
      for (std::size_t m = 0; m < n; ++m) {
        out.chunk_tensor[m].push_back(index[m].at(same_key(t)));
      }
      row = end;
    }
    base += s.nbytes;
  }
  for (std::size_t m = 0; m < n; ++m) {
    const TargetRank& target = members[m];
    RankPlan rp;
    rp.pp_rank = target.pp_rank;
    rp.tp_rank = target.tp_rank;
    rp.rdp_rank = target.rdp_rank;
    for (std::size_t i = 0; i < target.tensors.size(); ++i) {
      const TargetTensor& t = target.tensors[i];
      if (is_shared[m].count(i) == 0) {
        RankPlan one = planner.plan(TargetRank{target.pp_rank, target.tp_rank, target.rdp_rank,
                                               {t}});
        rp.tensors.push_back(std::move(one.tensors.front()));
        for (std::string& name : one.missing) rp.missing.push_back(std::move(name));
        continue;
      }
      TensorPlan tp = planner.plan_rows(target, t, 0, 0);
      tp.reads.clear();
      for (std::size_t c = 0; c < out.chunks.size(); ++c) {
        const SharedChunk& ch = out.chunks[c];
        if (out.chunk_tensor[m][c] != i || ch.reader != static_cast<int>(m)) continue;
        TensorPlan part = planner.plan_rows(target, t, ch.row_begin, ch.row_end);
        for (ReadOp& op : part.reads) tp.reads.push_back(std::move(op));
      }
      rp.tensors.push_back(std::move(tp));
    }
    out.ranks.push_back(std::move(rp));
  }
  return out;
}

RankPlan plan_load(const SavedCheckpoint& saved, const TargetRank& target,
                   const PlanOptions& options) {
  return Planner(saved, options).plan(target);
}

LoadPlan plan_load(const SavedCheckpoint& saved, const std::vector<TargetRank>& targets,
                   const PlanOptions& options) {
  Planner planner(saved, options);
  LoadPlan out;
  std::set<std::string> needed;
  for (const TargetRank& t : targets) {
    out.ranks.push_back(planner.plan(t));
    for (const TargetTensor& tt : t.tensors) needed.insert(tt.name);
  }
  for (const auto& [name, entry] : planner.entries()) {
    if (needed.count(name) == 0) out.unused.push_back(name);
  }
  return out;
}

}  // namespace ckpt
}  // namespace smp
