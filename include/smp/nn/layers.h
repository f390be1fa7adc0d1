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

/// Weights of one attention sublayer on this rank (smp.nn.DistributedAttentionLayer,
/// the `attention.` half of a transformer layer). Query/key/value are split by
/// output (this rank's heads), `dense` by input; q/k/v biases split with their
/// weights, the dense bias on tp_rank 0 only. LayerNorms are replicated;
/// undefined when the option is off.
struct AttentionWeights {
  at::Tensor query_weight, query_bias;  ///< [local_heads * head_size, hidden], [..]
  at::Tensor key_weight, key_bias;
  at::Tensor value_weight, value_bias;
  at::Tensor dense_weight;              ///< [hidden, local_heads * head_size]
  std::optional<at::Tensor> dense_bias;  ///< [hidden], tp_rank 0
  at::Tensor pre_ln_weight, pre_ln_bias;  ///< [hidden] (pre_layernorm)
  at::Tensor ln_weight, ln_bias;          ///< [hidden] (post_layernorm)
};

/// Weights of one MLP sublayer on this rank (smp.nn.DistributedTransformerOutputLayer,
/// the `output.` half): dense1 split by output (intermediate units), dense2 by
/// input, the dense2 bias on tp_rank 0 only.
struct MlpWeights {
  at::Tensor dense1_weight, dense1_bias;  ///< [local_intermediate, hidden], [..]
  at::Tensor dense2_weight;               ///< [hidden, local_intermediate]
  std::optional<at::Tensor> dense2_bias;  ///< [hidden], tp_rank 0
  at::Tensor pre_ln_weight, pre_ln_bias;  ///< [hidden] (pre_layernorm)
  at::Tensor ln_weight, ln_bias;          ///< [hidden] (post_layernorm)
};

/// One transformer layer: its attention sublayer, then its MLP sublayer.
struct TransformerWeights {
  AttentionWeights attention;
  MlpWeights mlp;
};

using ParamGetter = std::function<at::Tensor(const std::string&)>;

/// The weights from a module's local parameters, named as transformer_layout
/// (smp/nn/param_layout.h) names them after `prefix` ("query.weight" ...);
/// `get` returns an undefined tensor for a name this rank does not hold.
/// Throws ConfigError naming a missing parameter.
AttentionWeights attention_weights(const ParamGetter& get, const std::string& prefix,
                                   bool pre_layernorm, bool post_layernorm);
MlpWeights mlp_weights(const ParamGetter& get, const std::string& prefix, bool pre_layernorm,
                       bool post_layernorm);
/// A layer's weights: `attention.` and `output.` sublayers; with both
/// LayerNorm options the attention sublayer has no post LayerNorm (smp v1).
TransformerWeights transformer_weights(const ParamGetter& get, bool pre_layernorm,
                                       bool post_layernorm);

struct TransformerOptions {
  std::int64_t local_heads = 1;
  std::int64_t head_size = 64;
  double attention_dropout = 0.0;
  double hidden_dropout = 0.0;
  /// "gelu" (erf) | "gelu_tanh" (tanh approximation: GPT-2's gelu_new) | "relu"
  std::string activation = "gelu";
  double layernorm_epsilon = 1e-5;
  /// y = x + sublayer(LN(x)) (GPT style); with post_layernorm too, the post
  /// LayerNorm is applied to that sum, except that in a whole layer (as in
  /// smp v1) only the MLP sublayer's sum gets it (the layer's output).
  bool pre_layernorm = false;
  /// y = LN(x + sublayer(x)) (BERT style).
  bool post_layernorm = true;
  bool causal = false;      ///< self-attention only
  bool training = false;    ///< dropout on
  bool prescaled_batch = false;
  /// Attention scores and softmax in float32 (for fp16/bf16 inputs).
  bool attention_in_fp32 = false;
};

/// Dropout of rows that every member of TP_GROUP holds alike when
/// prescaled_batch is on: the mask is drawn on tp rank 0 and broadcast, so
/// the replicas stay equal; otherwise plain dropout. Identity when not training.
at::Tensor replicated_dropout(const at::Tensor& t, double p, bool training, bool prescaled_batch);

/// The attention sublayer: LN (pre) -> attention of this rank's heads over the
/// TP group's rows -> dense -> dropout -> x + that -> LN (post).
/// x: [batch, seq, hidden] (this rank's batch; the group's shared batch with
/// prescaled_batch); cross_states: [batch, seq_k, hidden] for cross-attention
/// (keys and values from them, no causal mask), or none for self-attention;
/// attention_mask: optional additive float mask broadcastable to
/// [batch, 1, seq, seq_k] (0 keep, large negative drop) for this rank's batch
/// (dimension 1 may be the number of heads only when tp_size is 1). Every
/// member of TP_GROUP passes a mask (and cross states) or none does.
/// prescaled_batch off: the TP group's batches are gathered at the input and
/// reduce-scattered back at the output; residual add, LayerNorms and hidden
/// dropout run on this rank's rows only. prescaled_batch on: the group shares
/// the batch (see replicated_dropout).
at::Tensor attention_forward(const at::Tensor& x, const std::optional<at::Tensor>& cross_states,
                             const std::optional<at::Tensor>& attention_mask,
                             const AttentionWeights& w, const TransformerOptions& options);

/// The MLP sublayer: LN (pre) -> dense1 -> activation -> dense2 -> dropout ->
/// x + that -> LN (post); batches as attention_forward. x: [batch, ..., hidden].
at::Tensor mlp_forward(const at::Tensor& x, const MlpWeights& w, const TransformerOptions& options);

/// One transformer layer: attention_forward (without its post LayerNorm when
/// pre_layernorm is on too) then mlp_forward. x: [batch, seq, hidden].
at::Tensor transformer_layer_forward(const at::Tensor& x,
                                     const std::optional<at::Tensor>& attention_mask,
                                     const TransformerWeights& w, const TransformerOptions& options);

}  // namespace smp::nn
