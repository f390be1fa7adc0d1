#pragma once
/// How the parameters of a tensor-parallel module relate to the parameters of
/// the non-distributed module it replaces: one ParamLayout per full parameter,
/// shared by the Python modules (smp.nn) and the C++ modules
/// (smp/nn/modules.h), so that names, shapes, splits and the initialization
/// are written once.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "smp/core/shard_spec.h"

namespace smp::nn {

/// How a full parameter is initialized (before it is sliced).
struct ParamInit {
  enum class Kind { kZeros, kOnes, kUniform, kNormal };
  Kind kind = Kind::kZeros;
  /// kUniform: U(-scale, scale); kNormal: N(0, scale^2).
  double scale = 0.0;
  /// A row (dim 0) set to zero after drawing (an embedding's padding_idx); -1: none.
  std::int64_t zero_row = -1;
};

struct ParamLayout {
  /// Name in the module, equal to the non-distributed module's ("weight",
  /// "attention.query.weight").
  std::string name;
  /// Shape of the full parameter.
  std::vector<std::int64_t> global_shape;
  /// Split across TP_GROUP along this dimension (uneven splits give the
  /// remainder to the lowest tp ranks); -1: not split.
  int split_dim = -1;
  /// When not split: the one tp rank that holds it (a row-parallel bias on
  /// tp rank 0), or -1 when every tp rank holds a replica.
  int holder = -1;
  ParamInit init;

  bool is_split() const { return split_dim >= 0; }
  /// False only for a parameter held by another tp rank alone.
  bool held_by(int tp_rank) const { return holder < 0 || holder == tp_rank; }
  /// True when the gradient on the holding ranks already contains the
  /// contributions of the whole TP group's batches (split parameters and
  /// single-holder ones): such gradients are summed over RDP_GROUP, not
  /// averaged over DP_GROUP (see smp/model/grad_reducer.h).
  bool distributed() const { return split_dim >= 0 || holder >= 0; }
  /// The ShardSpec of tp rank `tp_rank`'s local tensor (replicated for
  /// parameters that are not split). Throws ConfigError when not held there.
  ShardSpec spec(int tp_size, int tp_rank) const;
  /// Shape of the local tensor on tp rank `tp_rank`.
  std::vector<std::int64_t> local_shape(int tp_size, int tp_rank) const;
};

/// torch.nn.Linear(in, out, bias) split along the input dimension: weight
/// [out, in] split dim 1; bias [out] on tp rank 0. Init as torch.nn.Linear:
/// U(-1/sqrt(in), 1/sqrt(in)).
std::vector<ParamLayout> linear_layout(std::int64_t in_features, std::int64_t out_features,
                                       bool bias);

/// torch.nn.Embedding(num, dim): weight [num, dim] split dim 1 (embedding
/// dimension), or dim 0 with vocab_parallel. Init N(0, 1), the padding row
/// zero. padding_idx must be in [0, num) or -1 (none).
std::vector<ParamLayout> embedding_layout(std::int64_t num_embeddings, std::int64_t embedding_dim,
                                          bool vocab_parallel, std::int64_t padding_idx = -1);

/// Shape of one transformer layer (smp.nn.DistributedTransformerLayer).
struct TransformerConfig {
  std::int64_t num_attention_heads = 32;
  std::int64_t attention_head_size = 32;
  std::int64_t hidden_size = 1024;
  std::int64_t intermediate_size = 4096;
  bool pre_layernorm = false;
  bool post_layernorm = true;
  /// Standard deviation of the normal init of the projection weights.
  double initializer_range = 0.02;
};

/// Parameters of one transformer layer, named as smp v1's:
/// attention.{query,key,value}.{weight,bias} (split dim 0 by heads),
/// attention.dense.weight (split dim 1), attention.dense.bias (tp rank 0),
/// output.dense1.{weight,bias} (split dim 0), output.dense2.weight (split dim 1),
/// output.dense2.bias (tp rank 0), and per sublayer {attention,output}.pre_layernorm.*
/// (pre_layernorm) and {attention,output}.layernorm.* (post_layernorm; with both
/// options output.layernorm only, as smp v1), replicated.
/// Throws ConfigError when neither layernorm is on or a size is not positive.
std::vector<ParamLayout> transformer_layout(const TransformerConfig& config);

/// Draws every full parameter of `layouts` in order from one CPU generator
/// seeded with `seed` (so every rank draws the same full tensors) and returns
/// tp rank `tp_rank`'s local slices of those it holds, in layout order, as
/// float32 CPU tensors.
std::vector<at::Tensor> init_local(const std::vector<ParamLayout>& layouts, std::uint64_t seed,
                                   int tp_size, int tp_rank);

/// Tp rank `tp_rank`'s slice of the full parameter (a view of `full`). Throws
/// ConfigError naming the parameter when full's shape is not the global shape.
at::Tensor local_slice(const ParamLayout& layout, const at::Tensor& full, int tp_size,
                       int tp_rank);

/// Collective over TP_GROUP (every member calls it for the same parameter): the
/// full parameter, gathered from the shards, broadcast from its holder, or a
/// copy of the local replica. `local` is this rank's tensor, undefined where
/// not held; `options` give dtype and device of the result there.
at::Tensor gather_full(const ParamLayout& layout, const at::Tensor& local,
                       const at::TensorOptions& options);

/// Finds `name` in `layouts`; throws ConfigError listing the names otherwise.
const ParamLayout& find_layout(const std::vector<ParamLayout>& layouts, const std::string& name);

}  // namespace smp::nn
