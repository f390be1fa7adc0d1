#pragma once
/// Forward computations of the tensor-parallel layers, shared by the Python
/// modules (smp.nn) and the C++ modules (smp/nn/modules.h). Weights are this
/// rank's shards; the communication is done by smp/nn/functional.h, chosen by
/// `prescaled_batch` (see there).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace smp::nn {

/// smp's DistributedLinear: the weight [out, in] is split along the input
/// dimension (this rank holds [out, in_shard] at offset in_offset); the bias
/// lives on tp_rank 0 only (undefined elsewhere). x: [..., in] full features.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight_shard,
                          const std::optional<at::Tensor>& bias, std::int64_t in_offset,
                          bool prescaled_batch);

/// DistributedEmbedding. vocab_parallel=false: weight [num_embeddings,
/// dim_shard] holds columns at dim_offset of the embedding dimension;
/// vocab_parallel=true: weight [vocab_shard, dim] holds rows at vocab_offset.
/// ids: integer tensor of any shape; returns [*ids.shape, dim].
/// num_embeddings: the full vocabulary; every id of the TP group's rows must
/// be in [0, num_embeddings), else ConfigError naming the id (on every member,
/// since each checks the same gathered ids). -1: the weight's rows when not
/// vocab_parallel.
at::Tensor embedding_forward(const at::Tensor& ids, const at::Tensor& weight_shard,
                             std::int64_t full_dim, std::int64_t offset, bool vocab_parallel,
                             std::optional<std::int64_t> padding_idx, bool prescaled_batch,
                             std::int64_t num_embeddings = -1);

/// Weights of one transformer layer on this rank. Q/K/V and fc1 are split by
/// output (heads / intermediate units of this rank), attention output and fc2
/// by input; their biases: q/k/v/fc1 biases split with the weights, out/fc2
/// biases on tp_rank 0 only. LayerNorms are replicated: ln1/ln2 after the
/// residual adds (post_layernorm; with pre_layernorm too, ln2 only, as smp
/// v1), pre_ln1/pre_ln2 at the sublayers' inputs (pre_layernorm); undefined
/// when that option is off.
struct TransformerWeights {
  at::Tensor qkv_weight;  ///< [3 * local_heads * head_size, hidden] (q rows, then k, then v)
  at::Tensor qkv_bias;    ///< [3 * local_heads * head_size]
  at::Tensor out_weight;  ///< [hidden, local_heads * head_size]
  std::optional<at::Tensor> out_bias;  ///< [hidden], tp_rank 0
  at::Tensor ln1_weight, ln1_bias;     ///< [hidden]
  at::Tensor fc1_weight;  ///< [local_intermediate, hidden]
  at::Tensor fc1_bias;    ///< [local_intermediate]
  at::Tensor fc2_weight;  ///< [hidden, local_intermediate]
  std::optional<at::Tensor> fc2_bias;  ///< [hidden], tp_rank 0
  at::Tensor ln2_weight, ln2_bias;     ///< [hidden]
  at::Tensor pre_ln1_weight, pre_ln1_bias;  ///< [hidden]
  at::Tensor pre_ln2_weight, pre_ln2_bias;  ///< [hidden]
};

/// TransformerWeights from a module's local parameters named as
/// transformer_layout (smp/nn/param_layout.h) names them; `get` returns an
/// undefined tensor for a name this rank does not hold. Q, K and V are
/// concatenated (differentiably) into qkv.
TransformerWeights transformer_weights(const std::function<at::Tensor(const std::string&)>& get,
                                       bool pre_layernorm, bool post_layernorm);

struct TransformerOptions {
  std::int64_t local_heads = 1;
  std::int64_t head_size = 64;
  double attention_dropout = 0.0;
  double hidden_dropout = 0.0;
  std::string activation = "gelu";  ///< "gelu" | "relu"
  double layernorm_epsilon = 1e-5;
  /// y = x + sublayer(LN(x)) (GPT style); with post_layernorm too, as in
  /// smp v1, only the MLP sublayer's sum gets the post LayerNorm (the layer's
  /// output), the attention sublayer's does not.
  bool pre_layernorm = false;
  /// y = LN(x + sublayer(x)) (BERT style).
  bool post_layernorm = true;
  bool causal = false;
  bool training = false;  ///< dropout on
  bool prescaled_batch = false;
};

/// x: [batch, seq, hidden]; attention_mask: optional additive float mask
/// broadcastable to [batch, 1, seq, seq] (0 keep, large negative drop) for
/// this rank's batch (dimension 1 may be the number of heads only when
/// tp_size is 1). Every member of TP_GROUP passes a mask or none does.
/// prescaled_batch off: the attention and MLP blocks each gather the TP
/// group's batches at their input and reduce-scatter them back at their
/// output; residual adds, LayerNorms and hidden dropout run on this rank's
/// rows only. prescaled_batch on: the group shares the batch; hidden dropout
/// masks are drawn on tp rank 0 and broadcast so that the replicas agree.
at::Tensor transformer_layer_forward(const at::Tensor& x,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const TransformerWeights& w, const TransformerOptions& options);

}  // namespace smp::nn
