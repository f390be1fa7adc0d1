#include "smp/nn/functional.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <vector>

#include "smp/core/error.h"
#include "smp/core/shard_spec.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp::nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

CommGroup group_from(AutogradContext* ctx) {
  return static_cast<CommGroup>(ctx->saved_data["group"].toInt());
}

int group_rank(CommGroup group) {
  // Members of a group are ordered by the rank type of the same index.
  return smp::rank_of_type(static_cast<RankType>(group));
}

/// Every member's `mine` (a size along some dimension), index = group rank.
std::vector<std::int64_t> exchange_sizes(std::int64_t mine, CommGroup group, c10::Device device) {
  auto t = at::full({1}, mine, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor all = smp::allgather(t, group).cpu().contiguous();
  const std::int64_t* p = all.data_ptr<std::int64_t>();
  return std::vector<std::int64_t>(p, p + all.numel());
}

at::Tensor pad_along0(const at::Tensor& x, std::int64_t to) {
  if (x.size(0) == to) return x.contiguous();
  std::vector<std::int64_t> shape = x.sizes().vec();
  shape[0] = to;
  at::Tensor out = at::zeros(shape, x.options());
  out.narrow(0, 0, x.size(0)).copy_(x);
  return out;
}

/// Concatenates members' x along dim 0 given everyone's sizes.
at::Tensor gather_rows(const at::Tensor& x, const std::vector<std::int64_t>& sizes,
                       CommGroup group) {
  const std::int64_t max = *std::max_element(sizes.begin(), sizes.end());
  at::Tensor all = smp::allgather(pad_along0(x, max), group);  // [n, max, ...]
  bool even = std::all_of(sizes.begin(), sizes.end(), [&](std::int64_t s) { return s == max; });
  if (even) return all.flatten(0, 1);
  std::vector<at::Tensor> parts;
  for (std::size_t i = 0; i < sizes.size(); ++i) parts.push_back(all[i].narrow(0, 0, sizes[i]));
  return at::cat(parts, 0);
}

/// Sums members' row blocks (block i has sizes[i] rows) and returns block rank.
at::Tensor reduce_scatter_rows(const at::Tensor& x, const std::vector<std::int64_t>& sizes,
                               int rank, CommGroup group) {
  const std::int64_t max = *std::max_element(sizes.begin(), sizes.end());
  bool even = std::all_of(sizes.begin(), sizes.end(), [&](std::int64_t s) { return s == max; });
  at::Tensor in;
  if (even) {
    in = x.contiguous();
  } else {
    std::vector<at::Tensor> blocks;
    std::int64_t off = 0;
    for (std::int64_t s : sizes) {
      blocks.push_back(pad_along0(x.narrow(0, off, s), max));
      off += s;
    }
    in = at::cat(blocks, 0);
  }
  at::Tensor out = smp::reduce_scatter(in, group, ReduceOp::kSum);
  return even ? out : out.narrow(0, 0, sizes[rank]);
}

std::int64_t sum(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (auto x : v) s += x;
  return s;
}

std::vector<std::int64_t> sizes_from(AutogradContext* ctx) {
  return ctx->saved_data["sizes"].toIntVector();
}

struct GatherBatch : torch::autograd::Function<GatherBatch> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    const CommGroup g = static_cast<CommGroup>(group);
    auto sizes = exchange_sizes(x.size(0), g, x.device());
    ctx->saved_data["group"] = group;
    ctx->saved_data["sizes"] = sizes;
    return gather_rows(x, sizes, g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const CommGroup g = group_from(ctx);
    return {reduce_scatter_rows(grad[0], sizes_from(ctx), group_rank(g), g), at::Tensor()};
  }
};

struct ReduceScatterBatch : torch::autograd::Function<ReduceScatterBatch> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t local_batch,
                            int64_t group) {
    const CommGroup g = static_cast<CommGroup>(group);
    auto sizes = exchange_sizes(local_batch, g, x.device());
    SMP_CHECK(sum(sizes) == x.size(0), ConfigError, "reduce_scatter_batch: the input has ",
              x.size(0), " rows but the members' batches add up to ", sum(sizes),
              " in ", to_string(g), "; pass the rows of every member's batch (gather_batch output)");
    ctx->saved_data["group"] = group;
    ctx->saved_data["sizes"] = sizes;
    return reduce_scatter_rows(x, sizes, group_rank(g), g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {gather_rows(grad[0].contiguous(), sizes_from(ctx), group_from(ctx)), at::Tensor(),
            at::Tensor()};
  }
};

struct ReduceFromGroup : torch::autograd::Function<ReduceFromGroup> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, int64_t group) {
    at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
    smp::allreduce(out, static_cast<CommGroup>(group), ReduceOp::kSum);
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list grad) {
    return {grad[0], at::Tensor()};
  }
};

struct CopyToGroup : torch::autograd::Function<CopyToGroup> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    at::Tensor g = grad[0].clone(at::MemoryFormat::Contiguous);
    smp::allreduce(g, group_from(ctx), ReduceOp::kSum);
    return {g, at::Tensor()};
  }
};

struct ScatterToGroup : torch::autograd::Function<ScatterToGroup> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, int64_t group) {
    const CommGroup g = static_cast<CommGroup>(group);
    const int n = smp::topology().group_size(g);
    const int r = group_rank(g);
    const std::int64_t d = at::maybe_wrap_dim(dim, x.dim());
    ctx->saved_data["group"] = group;
    ctx->saved_data["dim"] = d;
    const auto sizes = split_sizes(x.size(d), n);
    return x.narrow(d, split_offset(x.size(d), n, r), sizes[r]);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {allgather_along(grad[0], ctx->saved_data["dim"].toInt(), group_from(ctx)),
            at::Tensor(), at::Tensor()};
  }
};

struct GatherFromGroup : torch::autograd::Function<GatherFromGroup> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, int64_t group) {
    const CommGroup g = static_cast<CommGroup>(group);
    const std::int64_t d = at::maybe_wrap_dim(dim, x.dim());
    at::Tensor moved = x.movedim(d, 0).contiguous();
    auto sizes = exchange_sizes(moved.size(0), g, x.device());
    ctx->saved_data["group"] = group;
    ctx->saved_data["dim"] = d;
    ctx->saved_data["sizes"] = sizes;
    return gather_rows(moved, sizes, g).movedim(0, d).contiguous();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const CommGroup g = group_from(ctx);
    const std::int64_t d = ctx->saved_data["dim"].toInt();
    const auto sizes = sizes_from(ctx);
    const int r = group_rank(g);
    std::int64_t off = 0;
    for (int i = 0; i < r; ++i) off += sizes[i];
    return {grad[0].narrow(d, off, sizes[r]), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor allgather_along(const at::Tensor& x, std::int64_t dim, CommGroup group) {
  const std::int64_t d = at::maybe_wrap_dim(dim, x.dim());
  at::Tensor moved = x.movedim(d, 0).contiguous();  // a copy when d != 0
  auto sizes = exchange_sizes(moved.size(0), group, x.device());
  at::Tensor rows = gather_rows(moved, sizes, group);
  moved = at::Tensor();  // freed before the transpose copy: peak 2x the full tensor, not 2.5x
  return rows.movedim(0, d).contiguous();
}

at::Tensor gather_batch(const at::Tensor& x, CommGroup group) {
  return GatherBatch::apply(x, static_cast<int64_t>(group));
}

at::Tensor reduce_scatter_batch(const at::Tensor& x, std::int64_t local_batch, CommGroup group) {
  return ReduceScatterBatch::apply(x, local_batch, static_cast<int64_t>(group));
}

at::Tensor reduce_from_group(const at::Tensor& x, CommGroup group) {
  return ReduceFromGroup::apply(x, static_cast<int64_t>(group));
}

at::Tensor copy_to_group(const at::Tensor& x, CommGroup group) {
  return CopyToGroup::apply(x, static_cast<int64_t>(group));
}

at::Tensor scatter_to_group(const at::Tensor& x, std::int64_t dim, CommGroup group) {
  return ScatterToGroup::apply(x, dim, static_cast<int64_t>(group));
}

at::Tensor gather_from_group(const at::Tensor& x, std::int64_t dim, CommGroup group) {
  return GatherFromGroup::apply(x, dim, static_cast<int64_t>(group));
}

}  // namespace smp::nn
