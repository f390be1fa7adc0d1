#pragma once
/// C++ tensor-parallel modules (torch::nn::Module), the counterparts of the
/// Python smp.nn modules: same parameter names, same shards, same
/// initialization for the same seed, forward through smp/nn/layers.h.
/// Construction needs smp::init() (it reads tp_size, tp_rank and the config
/// key prescaled_batch).
///
///   smp::nn::DistributedLinear fc(smp::nn::DistributedLinearOptions{1024, 4096});
///   at::Tensor y = fc(x);                      // x: this rank's batch [b, 1024]
///   fc->load_full("weight", full_weight);      // copy this rank's slice in
///   at::Tensor w = fc->gather_full("weight");  // collective over TP_GROUP

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "smp/core/shard_spec.h"
#include "smp/model/param_info.h"
#include "smp/nn/layers.h"
#include "smp/nn/param_layout.h"

namespace smp::nn {

/// The protocol every tensor-parallel module implements (the Python
/// DistributedModule mirrors it). Parameters a rank does not hold (a
/// row-parallel bias off tp rank 0) are not registered on that rank.
class ShardedModule : public torch::nn::Module {
 public:
  /// Every full parameter of the module, whichever tp rank holds it.
  const std::vector<ParamLayout>& layouts() const { return layouts_; }
  /// ShardSpec of each parameter registered on this rank.
  std::map<std::string, ShardSpec> shard_specs() const;
  /// Copies this rank's slice of the full parameter `name` into the local one
  /// (no-op where not held). Throws ConfigError for an unknown name or a shape
  /// that is not the global shape.
  void load_full(const std::string& name, const at::Tensor& full);
  /// Collective over TP_GROUP: the full parameter `name` on every member.
  at::Tensor gather_full(const std::string& name);
  /// The local parameter `name`, undefined when this rank does not hold it.
  at::Tensor local(const std::string& name) const;

 protected:
  /// Registers the parameters this rank holds (dotted names create plain
  /// child modules), initialized from `seed` as init_local does.
  void build(std::vector<ParamLayout> layouts, std::uint64_t seed);
  bool prescaled_batch_ = false;

 private:
  std::vector<ParamLayout> layouts_;
};

/// A ParamInfo for every parameter of `module` (recursively, named with
/// `prefix` + the module's dotted names): shards and other parameters of
/// ShardedModules carry their spec and count as distributed, the rest are
/// replicated. Throws ConfigError, its text starting with `who`, when a
/// shard's shape is not its spec's.
std::vector<ParamInfo> param_infos(torch::nn::Module& module, const std::string& who,
                                   const std::string& prefix = "");

struct DistributedLinearOptions {
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  bool bias = true;
  /// Seed of the full initialization; use the same on every rank.
  std::uint64_t seed = 0;
};

/// torch.nn.Linear with the weight split along the input dimension; x is
/// [..., in_features] (this rank's batch, or the TP group's shared batch
/// with prescaled_batch).
class DistributedLinearImpl : public ShardedModule {
 public:
  explicit DistributedLinearImpl(const DistributedLinearOptions& options);
  at::Tensor forward(const at::Tensor& x);
  const DistributedLinearOptions& options() const { return options_; }

 private:
  DistributedLinearOptions options_;
};
TORCH_MODULE(DistributedLinear);

struct DistributedEmbeddingOptions {
  std::int64_t num_embeddings = 0;
  std::int64_t embedding_dim = 0;
  /// Index whose row stays zero and gets no gradient; negative counts from the end.
  std::optional<std::int64_t> padding_idx;
  /// Split the vocabulary (rows) instead of the embedding dimension.
  bool vocab_parallel = false;
  std::uint64_t seed = 0;
};

class DistributedEmbeddingImpl : public ShardedModule {
 public:
  explicit DistributedEmbeddingImpl(const DistributedEmbeddingOptions& options);
  /// ids: integer tensor [batch, ...]; returns [*ids.shape, embedding_dim].
  at::Tensor forward(const at::Tensor& ids);
  const DistributedEmbeddingOptions& options() const { return options_; }

 private:
  DistributedEmbeddingOptions options_;
};
TORCH_MODULE(DistributedEmbedding);

struct DistributedTransformerLayerOptions {
  TransformerConfig config;
  double attention_dropout_prob = 0.1;
  double hidden_dropout_prob = 0.1;
  std::string activation = "gelu";  ///< "gelu" | "gelu_tanh" | "relu"
  double layernorm_epsilon = 1e-5;
  /// Causal (decoder) attention for sequences up to this length; nullopt: none.
  std::optional<std::int64_t> causal_mask_size;
  std::uint64_t seed = 0;
};

/// One transformer layer (attention + MLP) split across TP_GROUP by heads
/// and intermediate units. Throws ConfigError when num_attention_heads is not
/// divisible by tp_size (shards of the query/key/value weights must be
/// contiguous row ranges of whole heads).
class DistributedTransformerLayerImpl : public ShardedModule {
 public:
  explicit DistributedTransformerLayerImpl(const DistributedTransformerLayerOptions& options);
  /// x: [batch, seq, hidden]; mask: see transformer_layer_forward.
  at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& attention_mask = {});
  const DistributedTransformerLayerOptions& options() const { return options_; }

 private:
  DistributedTransformerLayerOptions options_;
  TransformerOptions forward_options_;
};
TORCH_MODULE(DistributedTransformerLayer);

/// Checks the transformer split on this TP group and returns the forward
/// options for it (local heads etc.); shared with the Python module.
TransformerOptions transformer_options(const TransformerConfig& config, double attention_dropout,
                                       double hidden_dropout, const std::string& activation,
                                       double layernorm_epsilon, bool causal, bool prescaled_batch,
                                       int tp_size);

}  // namespace smp::nn
