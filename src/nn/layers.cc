#include "smp/nn/layers.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "smp/core/error.h"
#include "smp/nn/functional.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp::nn {
namespace {

constexpr CommGroup kTp = CommGroup::kTpGroup;

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

/// Entry of a block whose weights are split: the TP group's rows (own batches
/// gathered, or the shared batch).
at::Tensor enter(const at::Tensor& x, bool prescaled_batch) {
  if (tp_size() == 1) return x;
  return prescaled_batch ? copy_to_group(x, kTp) : gather_batch(x, kTp);
}

/// Exit of such a block: `partial` holds this rank's partial sums for the rows
/// of enter(); returns the summed rows of this rank's batch.
at::Tensor leave(const at::Tensor& partial, std::int64_t local_batch, bool prescaled_batch) {
  if (tp_size() == 1) return partial;
  return prescaled_batch ? reduce_from_group(partial, kTp)
                         : reduce_scatter_batch(partial, local_batch, kTp);
}

/// Non-differentiable: the TP group's rows of an integer or mask tensor.
at::Tensor enter_nograd(const at::Tensor& x, bool prescaled_batch) {
  if (tp_size() == 1 || prescaled_batch) return x;
  return allgather_along(x.contiguous(), 0, kTp);
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }

}  // namespace

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight_shard,
                          const std::optional<at::Tensor>& bias, std::int64_t in_offset,
                          bool prescaled_batch) {
  SMP_CHECK(weight_shard.dim() == 2, ConfigError, "DistributedLinear on tp rank ", tp_rank(),
            ": the weight shard must be 2-D [out, in_shard], got shape ", shape_str(weight_shard));
  SMP_CHECK(x.dim() >= 1 && in_offset >= 0 && in_offset + weight_shard.size(1) <= x.size(-1),
            ConfigError, "DistributedLinear on tp rank ", tp_rank(), ": the input has shape ",
            shape_str(x), " but this rank's weight shard covers input features [", in_offset,
            ", ", in_offset + weight_shard.size(1),
            "); pass inputs whose last dimension is in_features");
  const at::Tensor x2 = x.dim() == 1 ? x.unsqueeze(0) : x;
  const at::Tensor xin = enter(x2, prescaled_batch);
  const at::Tensor y = at::linear(xin.narrow(-1, in_offset, weight_shard.size(1)), weight_shard,
                                  opt(bias));
  const at::Tensor out = leave(y, x2.size(0), prescaled_batch);
  return x.dim() == 1 ? out.squeeze(0) : out;
}

at::Tensor embedding_forward(const at::Tensor& ids, const at::Tensor& weight_shard,
                             std::int64_t full_dim, std::int64_t offset, bool vocab_parallel,
                             std::optional<std::int64_t> padding_idx, bool prescaled_batch,
                             std::int64_t num_embeddings) {
  SMP_CHECK(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type()),
            ConfigError, "DistributedEmbedding: the indices must be an integer tensor, got ",
            ids.scalar_type());
  SMP_CHECK(weight_shard.dim() == 2, ConfigError, "DistributedEmbedding on tp rank ", tp_rank(),
            ": the weight shard must be 2-D, got shape ", shape_str(weight_shard));
  SMP_CHECK(prescaled_batch || tp_size() == 1 || ids.dim() >= 1, ConfigError,
            "DistributedEmbedding: with prescaled_batch off the indices need a batch dimension "
            "(dim 0); got a 0-d tensor");
  const std::int64_t local_batch = ids.dim() >= 1 ? ids.size(0) : 0;
  const at::Tensor all = enter_nograd(ids, prescaled_batch).to(at::kLong);
  // Every member checks the same (gathered or shared) ids, so all raise alike.
  if (num_embeddings < 0 && !vocab_parallel) num_embeddings = weight_shard.size(0);
  if (all.numel() > 0) {
    const at::Tensor bad = (all < 0).logical_or(
        num_embeddings >= 0 ? all >= num_embeddings : at::zeros_like(all, at::kBool));
    if (bad.any().item<bool>()) {
      const std::int64_t id = all.masked_select(bad).flatten()[0].item<std::int64_t>();
      SMP_THROW(ConfigError, "DistributedEmbedding on tp rank ", tp_rank(), ": index ", id,
                " is out of range for a vocabulary of ", num_embeddings,
                " embeddings (valid ids: 0 to ", num_embeddings - 1,
                "); check the tokenizer's vocabulary size against num_embeddings");
    }
  }

  if (!vocab_parallel) {
    SMP_CHECK(offset >= 0 && offset + weight_shard.size(1) <= full_dim, ConfigError,
              "DistributedEmbedding on tp rank ", tp_rank(), ": shard columns [", offset, ", ",
              offset + weight_shard.size(1), ") exceed embedding_dim ", full_dim);
    const at::Tensor e = at::embedding(weight_shard, all, padding_idx.value_or(-1));
    if (tp_size() == 1) return e;
    if (prescaled_batch) return gather_from_group(e, -1, kTp);
    // Place this rank's columns of every row, zero elsewhere; the sum over
    // the group hands each rank all columns of its own rows.
    const at::Tensor placed =
        at::constant_pad_nd(e, {offset, full_dim - offset - weight_shard.size(1)}, 0.0);
    return reduce_scatter_batch(placed, local_batch, kTp);
  }

  const std::int64_t rows = weight_shard.size(0);
  const at::Tensor outside = (all < offset).logical_or(all >= offset + rows);
  const at::Tensor local_ids = (all - offset).masked_fill(outside, 0);
  std::int64_t local_pad = -1;
  if (padding_idx && *padding_idx >= offset && *padding_idx < offset + rows)
    local_pad = *padding_idx - offset;
  const at::Tensor e =
      at::embedding(weight_shard, local_ids, local_pad).masked_fill(outside.unsqueeze(-1), 0.0);
  return leave(e, local_batch, prescaled_batch);
}

namespace {

at::Tensor need(const ParamGetter& get, const std::string& name) {
  at::Tensor t = get(name);
  SMP_CHECK(t.defined(), ConfigError, "transformer weights: parameter '", name,
            "' is missing on tp rank ", tp_rank());
  return t;
}

std::optional<at::Tensor> maybe(const ParamGetter& get, const std::string& name) {
  at::Tensor t = get(name);
  if (t.defined()) return t;
  return std::nullopt;
}

void check_options(const TransformerOptions& o, const char* what) {
  SMP_CHECK(o.activation == "gelu" || o.activation == "gelu_tanh" || o.activation == "relu",
            ConfigError, what, ": activation must be \"gelu\", \"gelu_tanh\" or \"relu\", got \"",
            o.activation, "\"");
}

at::Tensor layer_norm(const at::Tensor& t, const at::Tensor& weight, const at::Tensor& bias,
                      double eps) {
  return at::layer_norm(t, {t.size(-1)}, weight, bias, eps);
}

/// The mask for the TP group's rows (see attention_forward).
std::optional<at::Tensor> group_mask(const std::optional<at::Tensor>& attention_mask,
                                     std::int64_t batch, bool prescaled, const char* what) {
  if (!attention_mask) return std::nullopt;
  at::Tensor m = *attention_mask;
  SMP_CHECK(at::isFloatingType(m.scalar_type()), ConfigError, what,
            ": attention_mask must be an additive float mask (0 keep, large negative drop), "
            "got dtype ", m.scalar_type());
  SMP_CHECK(m.dim() <= 4, ConfigError, what, ": attention_mask must broadcast to [batch, 1, ",
            "seq, seq], got shape ", shape_str(m));
  while (m.dim() < 4) m = m.unsqueeze(0);
  const bool tp1 = tp_size() == 1;
  SMP_CHECK(tp1 || m.size(1) == 1, ConfigError, what,
            ": attention_mask dimension 1 must be 1 (one mask for all heads) when "
            "tensor_parallel_degree > 1, got shape ", shape_str(m));
  if (!tp1 && !prescaled) {
    m = enter_nograd(m.expand({batch, m.size(1), m.size(2), m.size(3)}).contiguous(), false);
  }
  return m;
}

}  // namespace

AttentionWeights attention_weights(const ParamGetter& get, const std::string& prefix, bool pre,
                                   bool post) {
  AttentionWeights w;
  w.query_weight = need(get, prefix + "query.weight");
  w.query_bias = need(get, prefix + "query.bias");
  w.key_weight = need(get, prefix + "key.weight");
  w.key_bias = need(get, prefix + "key.bias");
  w.value_weight = need(get, prefix + "value.weight");
  w.value_bias = need(get, prefix + "value.bias");
  w.dense_weight = need(get, prefix + "dense.weight");
  w.dense_bias = maybe(get, prefix + "dense.bias");
  if (pre) {
    w.pre_ln_weight = need(get, prefix + "pre_layernorm.weight");
    w.pre_ln_bias = need(get, prefix + "pre_layernorm.bias");
  }
  if (post) {
    w.ln_weight = need(get, prefix + "layernorm.weight");
    w.ln_bias = need(get, prefix + "layernorm.bias");
  }
  return w;
}

MlpWeights mlp_weights(const ParamGetter& get, const std::string& prefix, bool pre, bool post) {
  MlpWeights w;
  w.dense1_weight = need(get, prefix + "dense1.weight");
  w.dense1_bias = need(get, prefix + "dense1.bias");
  w.dense2_weight = need(get, prefix + "dense2.weight");
  w.dense2_bias = maybe(get, prefix + "dense2.bias");
  if (pre) {
    w.pre_ln_weight = need(get, prefix + "pre_layernorm.weight");
    w.pre_ln_bias = need(get, prefix + "pre_layernorm.bias");
  }
  if (post) {
    w.ln_weight = need(get, prefix + "layernorm.weight");
    w.ln_bias = need(get, prefix + "layernorm.bias");
  }
  return w;
}

TransformerWeights transformer_weights(const ParamGetter& get, bool pre_layernorm,
                                       bool post_layernorm) {
  return {attention_weights(get, "attention.", pre_layernorm, post_layernorm && !pre_layernorm),
          mlp_weights(get, "output.", pre_layernorm, post_layernorm)};
}

at::Tensor replicated_dropout(const at::Tensor& t, double p, bool training, bool prescaled_batch) {
  if (!training || p <= 0.0) return t;
  if (tp_size() == 1 || !prescaled_batch) return at::dropout(t, p, true);
  at::Tensor keep = at::empty(t.sizes(), t.options()).bernoulli_(1.0 - p);
  smp::broadcast(keep, 0, kTp);
  return t * keep / (1.0 - p);
}

at::Tensor attention_forward(const at::Tensor& x, const std::optional<at::Tensor>& cross_states,
                             const std::optional<at::Tensor>& attention_mask,
                             const AttentionWeights& w, const TransformerOptions& o) {
  const char* what = "DistributedAttentionLayer";
  check_options(o, what);
  SMP_CHECK(x.dim() == 3, ConfigError, what, ": hidden_states must be [batch, seq, hidden], got ",
            shape_str(x));
  const std::int64_t b = x.size(0), s = x.size(1), hidden = x.size(2);
  const std::int64_t lh = o.local_heads, hd = o.head_size;
  SMP_CHECK(w.query_weight.dim() == 2 && w.query_weight.size(0) == lh * hd &&
                w.query_weight.size(1) == hidden,
            ConfigError, what, " on tp rank ", tp_rank(), ": query weight has shape ",
            shape_str(w.query_weight), ", expected [", lh * hd, ", ", hidden, "] for ", lh,
            " local heads of size ", hd, " and hidden size ", hidden,
            " (the input's last dimension)");
  if (cross_states) {
    SMP_CHECK(cross_states->dim() == 3 && cross_states->size(0) == b &&
                  cross_states->size(2) == hidden,
              ConfigError, what, ": cross_states must be [", b, ", seq_k, ", hidden, "], got ",
              shape_str(*cross_states));
  }
  const std::optional<at::Tensor> mask = group_mask(attention_mask, b, o.prescaled_batch, what);

  const at::Tensor h =
      o.pre_layernorm ? layer_norm(x, w.pre_ln_weight, w.pre_ln_bias, o.layernorm_epsilon) : x;
  const at::Tensor hin = enter(h, o.prescaled_batch);
  const std::int64_t rows = hin.size(0);
  auto heads = [&](const at::Tensor& t) {
    return t.reshape({rows, t.size(1), lh, hd}).transpose(1, 2);
  };
  at::Tensor q, k, v;
  if (cross_states) {
    const at::Tensor cin = enter(*cross_states, o.prescaled_batch);
    q = heads(at::linear(hin, w.query_weight, w.query_bias));
    const auto kv = at::linear(cin, at::cat({w.key_weight, w.value_weight}, 0),
                               at::cat({w.key_bias, w.value_bias}, 0))
                        .split(lh * hd, -1);
    k = heads(kv[0]);
    v = heads(kv[1]);
  } else {
    const auto qkv = at::linear(hin, at::cat({w.query_weight, w.key_weight, w.value_weight}, 0),
                                at::cat({w.query_bias, w.key_bias, w.value_bias}, 0))
                         .split(lh * hd, -1);
    q = heads(qkv[0]);
    k = heads(qkv[1]);
    v = heads(qkv[2]);
  }
  const auto dtype = q.scalar_type();
  if (o.attention_in_fp32) {
    q = q.to(at::kFloat);
    k = k.to(at::kFloat);
  }
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
  if (o.causal && !cross_states) {
    const at::Tensor future = at::ones({s, s}, x.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  }
  if (mask) scores = scores + mask->to(scores.scalar_type());
  at::Tensor probs = at::softmax(scores, -1).to(dtype);
  if (o.training && o.attention_dropout > 0.0) probs = at::dropout(probs, o.attention_dropout, true);
  const at::Tensor ctx = at::matmul(probs, v).transpose(1, 2).reshape({rows, s, lh * hd});
  const at::Tensor attn =
      leave(at::linear(ctx, w.dense_weight, opt(w.dense_bias)), b, o.prescaled_batch);
  at::Tensor out = x + replicated_dropout(attn, o.hidden_dropout, o.training, o.prescaled_batch);
  if (o.post_layernorm) out = layer_norm(out, w.ln_weight, w.ln_bias, o.layernorm_epsilon);
  return out;
}

at::Tensor mlp_forward(const at::Tensor& x, const MlpWeights& w, const TransformerOptions& o) {
  const char* what = "DistributedTransformerOutputLayer";
  check_options(o, what);
  SMP_CHECK(x.dim() >= 2 && w.dense1_weight.dim() == 2 && x.size(-1) == w.dense1_weight.size(1),
            ConfigError, what, " on tp rank ", tp_rank(), ": the input has shape ",
            shape_str(x), " but dense1's weight shard is ", shape_str(w.dense1_weight),
            "; pass [batch, ..., hidden_size]");
  const at::Tensor h =
      o.pre_layernorm ? layer_norm(x, w.pre_ln_weight, w.pre_ln_bias, o.layernorm_epsilon) : x;
  const at::Tensor hin = enter(h, o.prescaled_batch);
  at::Tensor f = at::linear(hin, w.dense1_weight, w.dense1_bias);
  if (o.activation == "relu") {
    f = at::relu(f);
  } else {
    f = at::gelu(f, o.activation == "gelu_tanh" ? "tanh" : "none");
  }
  const at::Tensor mlp =
      leave(at::linear(f, w.dense2_weight, opt(w.dense2_bias)), x.size(0), o.prescaled_batch);
  at::Tensor out = x + replicated_dropout(mlp, o.hidden_dropout, o.training, o.prescaled_batch);
  if (o.post_layernorm) out = layer_norm(out, w.ln_weight, w.ln_bias, o.layernorm_epsilon);
  return out;
}

at::Tensor transformer_layer_forward(const at::Tensor& x,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const TransformerWeights& w, const TransformerOptions& o) {
  SMP_CHECK(x.dim() == 3, ConfigError,
            "DistributedTransformerLayer: hidden_states must be [batch, seq, hidden], got ",
            shape_str(x));
  SMP_CHECK(o.pre_layernorm || o.post_layernorm, ConfigError,
            "DistributedTransformerLayer: at least one of pre_layernorm and post_layernorm must "
            "be true");
  TransformerOptions attention = o;
  attention.post_layernorm = o.post_layernorm && !o.pre_layernorm;
  return mlp_forward(attention_forward(x, std::nullopt, attention_mask, w.attention, attention),
                     w.mlp, o);
}

}  // namespace smp::nn
