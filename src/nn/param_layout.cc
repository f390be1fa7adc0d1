#include "smp/nn/param_layout.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <sstream>

#include "smp/core/error.h"
#include "smp/nn/functional.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp::nn {
namespace {

std::string shape_str(c10::IntArrayRef shape) {
  std::ostringstream os;
  os << shape;
  return os.str();
}

ParamLayout make(std::string name, std::vector<std::int64_t> shape, int split_dim, int holder,
                 ParamInit init) {
  ParamLayout p;
  p.name = std::move(name);
  p.global_shape = std::move(shape);
  p.split_dim = split_dim;
  p.holder = holder;
  p.init = init;
  return p;
}

ParamInit uniform(double bound) { return {ParamInit::Kind::kUniform, bound, -1}; }
ParamInit normal(double std) { return {ParamInit::Kind::kNormal, std, -1}; }
ParamInit zeros() { return {ParamInit::Kind::kZeros, 0.0, -1}; }
ParamInit ones() { return {ParamInit::Kind::kOnes, 0.0, -1}; }

void check_positive(const char* what, const char* key, std::int64_t v) {
  SMP_CHECK(v > 0, ConfigError, what, ": ", key, " must be positive, got ", v);
}

}  // namespace

ShardSpec ParamLayout::spec(int tp_size, int tp_rank) const {
  SMP_CHECK(held_by(tp_rank), ConfigError, "parameter '", name, "' is held by tp rank ", holder,
            " only, not by tp rank ", tp_rank);
  if (!is_split()) return ShardSpec::replicated(global_shape);
  return ShardSpec::split(global_shape, split_dim, tp_size, tp_rank);
}

std::vector<std::int64_t> ParamLayout::local_shape(int tp_size, int tp_rank) const {
  return spec(tp_size, tp_rank).local_shape();
}

std::vector<ParamLayout> linear_layout(std::int64_t in_features, std::int64_t out_features,
                                       bool bias) {
  check_positive("DistributedLinear", "in_features", in_features);
  check_positive("DistributedLinear", "out_features", out_features);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  std::vector<ParamLayout> out{make("weight", {out_features, in_features}, 1, -1, uniform(bound))};
  if (bias) out.push_back(make("bias", {out_features}, -1, 0, uniform(bound)));
  return out;
}

std::vector<ParamLayout> embedding_layout(std::int64_t num_embeddings, std::int64_t embedding_dim,
                                          bool vocab_parallel, std::int64_t padding_idx) {
  check_positive("DistributedEmbedding", "num_embeddings", num_embeddings);
  check_positive("DistributedEmbedding", "embedding_dim", embedding_dim);
  SMP_CHECK(padding_idx >= -1 && padding_idx < num_embeddings, ConfigError,
            "DistributedEmbedding: padding_idx ", padding_idx, " is outside the vocabulary [0, ",
            num_embeddings, "); pass an index below num_embeddings (negative ones count from the end) "
            "or None");
  ParamInit init = normal(1.0);
  init.zero_row = padding_idx;
  return {make("weight", {num_embeddings, embedding_dim}, vocab_parallel ? 0 : 1, -1, init)};
}

std::vector<ParamLayout> transformer_layout(const TransformerConfig& c) {
  const char* what = "DistributedTransformerLayer";
  check_positive(what, "num_attention_heads", c.num_attention_heads);
  check_positive(what, "attention_head_size", c.attention_head_size);
  check_positive(what, "hidden_size", c.hidden_size);
  check_positive(what, "intermediate_size", c.intermediate_size);
  SMP_CHECK(c.pre_layernorm || c.post_layernorm, ConfigError, what,
            ": at least one of pre_layernorm and post_layernorm must be True");
  const std::int64_t h = c.hidden_size, a = c.num_attention_heads * c.attention_head_size,
                     i = c.intermediate_size;
  const ParamInit w = normal(c.initializer_range);
  std::vector<ParamLayout> out;
  for (const char* qkv : {"query", "key", "value"}) {
    out.push_back(make(std::string("attention.") + qkv + ".weight", {a, h}, 0, -1, w));
    out.push_back(make(std::string("attention.") + qkv + ".bias", {a}, 0, -1, zeros()));
  }
  out.push_back(make("attention.dense.weight", {h, a}, 1, -1, w));
  out.push_back(make("attention.dense.bias", {h}, -1, 0, zeros()));
  // As smp v1: with both options the attention sublayer has no post
  // LayerNorm (the layer is pre-LN, plus one LayerNorm at its output).
  auto layernorms = [&](const std::string& sub) {
    if (c.pre_layernorm) {
      out.push_back(make(sub + ".pre_layernorm.weight", {h}, -1, -1, ones()));
      out.push_back(make(sub + ".pre_layernorm.bias", {h}, -1, -1, zeros()));
    }
    if (c.post_layernorm && (sub == "output" || !c.pre_layernorm)) {
      out.push_back(make(sub + ".layernorm.weight", {h}, -1, -1, ones()));
      out.push_back(make(sub + ".layernorm.bias", {h}, -1, -1, zeros()));
    }
  };
  layernorms("attention");
  out.push_back(make("output.dense1.weight", {i, h}, 0, -1, w));
  out.push_back(make("output.dense1.bias", {i}, 0, -1, zeros()));
  out.push_back(make("output.dense2.weight", {h, i}, 1, -1, w));
  out.push_back(make("output.dense2.bias", {h}, -1, 0, zeros()));
  layernorms("output");
  return out;
}

std::vector<at::Tensor> init_local(const std::vector<ParamLayout>& layouts, std::uint64_t seed,
                                   int tp_size, int tp_rank) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> out;
  for (const ParamLayout& p : layouts) {
    at::Tensor full = at::empty(p.global_shape, at::TensorOptions().dtype(at::kFloat));
    switch (p.init.kind) {
      case ParamInit::Kind::kZeros: full.zero_(); break;
      case ParamInit::Kind::kOnes: full.fill_(1.0); break;
      case ParamInit::Kind::kUniform: full.uniform_(-p.init.scale, p.init.scale, gen); break;
      case ParamInit::Kind::kNormal: full.normal_(0.0, p.init.scale, gen); break;
    }
    if (p.init.zero_row >= 0) full[p.init.zero_row].zero_();
    if (p.held_by(tp_rank)) out.push_back(local_slice(p, full, tp_size, tp_rank).clone());
  }
  return out;
}

at::Tensor local_slice(const ParamLayout& layout, const at::Tensor& full, int tp_size,
                       int tp_rank) {
  SMP_CHECK(full.defined() && full.sizes().vec() == layout.global_shape, ConfigError,
            "parameter '", layout.name, "': the full tensor has shape ",
            full.defined() ? shape_str(full.sizes()) : std::string("(undefined)"),
            " but the module's full parameter has shape ", shape_str(layout.global_shape),
            "; pass the unsharded parameter of the same module configuration");
  const ShardSpec spec = layout.spec(tp_size, tp_rank);
  if (spec.is_replicated()) return full;
  return full.narrow(spec.split_dim, spec.offset(), spec.local_shape()[spec.split_dim]);
}

at::Tensor gather_full(const ParamLayout& layout, const at::Tensor& local,
                       const at::TensorOptions& options) {
  const int tp = tp_rank();
  SMP_CHECK(local.defined() == layout.held_by(tp), ConfigError, "gather_full('", layout.name,
            "') on tp rank ", tp, ": ",
            local.defined() ? "a local tensor was given for a parameter this rank does not hold"
                            : "the local tensor is missing");
  c10::NoGradGuard no_grad;
  if (layout.is_split()) {
    if (tp_size() == 1) return local.detach().clone();
    return allgather_along(local.detach().contiguous(), layout.split_dim, CommGroup::kTpGroup);
  }
  if (layout.holder < 0) return local.detach().clone();
  at::Tensor out = layout.held_by(tp) ? local.detach().clone(at::MemoryFormat::Contiguous)
                                      : at::empty(layout.global_shape, options);
  if (tp_size() > 1) smp::broadcast(out, layout.holder, CommGroup::kTpGroup);
  return out;
}

const ParamLayout& find_layout(const std::vector<ParamLayout>& layouts, const std::string& name) {
  for (const ParamLayout& p : layouts)
    if (p.name == name) return p;
  std::ostringstream names;
  for (std::size_t i = 0; i < layouts.size(); ++i) names << (i ? ", " : "") << layouts[i].name;
  SMP_THROW(ConfigError, "the module has no parameter '", name, "'; its parameters are: ",
            names.str());
}

}  // namespace smp::nn
