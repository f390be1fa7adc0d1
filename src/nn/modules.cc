#include "smp/nn/modules.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "smp/core/error.h"
#include "smp/runtime.h"

namespace smp::nn {

std::map<std::string, ShardSpec> ShardedModule::shard_specs() const {
  std::map<std::string, ShardSpec> out;
  for (const ParamLayout& p : layouts_)
    if (p.held_by(tp_rank())) out.emplace(p.name, p.spec(tp_size(), tp_rank()));
  return out;
}

at::Tensor ShardedModule::local(const std::string& name) const {
  const auto params = named_parameters(/*recurse=*/true);
  const auto* found = params.find(name);
  return found ? *found : at::Tensor();
}

void ShardedModule::load_full(const std::string& name, const at::Tensor& full) {
  const ParamLayout& layout = find_layout(layouts_, name);
  // Check the shape on every rank, also where the parameter is not held.
  SMP_CHECK(full.defined() && full.sizes().vec() == layout.global_shape, ConfigError,
            "load_full('", name, "') on tp rank ", tp_rank(), ": expected the full parameter of "
            "shape ", ShardSpec::replicated(layout.global_shape).describe(), ", got ",
            full.defined() ? full.sizes() : c10::IntArrayRef{});
  if (!layout.held_by(tp_rank())) return;
  at::Tensor mine = local(name);
  torch::NoGradGuard no_grad;
  mine.copy_(local_slice(layout, full, tp_size(), tp_rank()));
}

at::Tensor ShardedModule::gather_full(const std::string& name) {
  const ParamLayout& layout = find_layout(layouts_, name);
  at::Tensor mine = local(name);
  const at::Tensor any = parameters().empty() ? at::Tensor() : parameters().front();
  const at::TensorOptions options =
      any.defined() ? any.options() : at::TensorOptions().dtype(at::kFloat);
  return nn::gather_full(layout, mine, options);
}

void ShardedModule::build(std::vector<ParamLayout> layouts, std::uint64_t seed) {
  layouts_ = std::move(layouts);
  const std::vector<at::Tensor> values = init_local(layouts_, seed, tp_size(), tp_rank());
  std::size_t next = 0;
  for (const ParamLayout& p : layouts_) {
    if (!p.held_by(tp_rank())) continue;
    torch::nn::Module* owner = this;
    std::string rest = p.name;
    for (std::size_t dot; (dot = rest.find('.')) != std::string::npos;) {
      const std::string child = rest.substr(0, dot);
      rest = rest.substr(dot + 1);
      auto children = owner->named_children();
      if (const auto* found = children.find(child)) {
        owner = found->get();
      } else {
        owner = owner->register_module(child, std::make_shared<torch::nn::Module>(child)).get();
      }
    }
    owner->register_parameter(rest, values[next++]);
  }
  prescaled_batch_ = config().prescaled_batch;
}

DistributedLinearImpl::DistributedLinearImpl(const DistributedLinearOptions& options)
    : options_(options) {
  build(linear_layout(options.in_features, options.out_features, options.bias), options.seed);
}

at::Tensor DistributedLinearImpl::forward(const at::Tensor& x) {
  SMP_CHECK(x.dim() >= 1 && x.size(-1) == options_.in_features, ConfigError,
            "DistributedLinear: the input has ", x.dim() >= 1 ? x.size(-1) : 0,
            " features in its last dimension but in_features is ", options_.in_features);
  const at::Tensor bias = local("bias");
  const std::int64_t offset = split_offset(options_.in_features, tp_size(), tp_rank());
  return linear_forward(x, local("weight"),
                        bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, offset,
                        prescaled_batch_);
}

namespace {
std::int64_t normalize_padding_idx(const DistributedEmbeddingOptions& o) {
  if (!o.padding_idx) return -1;
  const std::int64_t p = *o.padding_idx;
  SMP_CHECK(p >= -o.num_embeddings && p < o.num_embeddings, ConfigError,
            "DistributedEmbedding: padding_idx ", p, " is outside the vocabulary of ",
            o.num_embeddings, " embeddings; pass an index in [", -o.num_embeddings, ", ",
            o.num_embeddings, ") or none");
  return p < 0 ? p + o.num_embeddings : p;
}
}  // namespace

DistributedEmbeddingImpl::DistributedEmbeddingImpl(const DistributedEmbeddingOptions& options)
    : options_(options) {
  const std::int64_t pad = normalize_padding_idx(options);
  if (pad >= 0) options_.padding_idx = pad;
  build(embedding_layout(options.num_embeddings, options.embedding_dim, options.vocab_parallel,
                         pad),
        options.seed);
}

at::Tensor DistributedEmbeddingImpl::forward(const at::Tensor& ids) {
  const std::int64_t total =
      options_.vocab_parallel ? options_.num_embeddings : options_.embedding_dim;
  return embedding_forward(ids, local("weight"), options_.embedding_dim,
                           split_offset(total, tp_size(), tp_rank()), options_.vocab_parallel,
                           options_.padding_idx, prescaled_batch_, options_.num_embeddings);
}

TransformerOptions transformer_options(const TransformerConfig& config, double attention_dropout,
                                       double hidden_dropout, const std::string& activation,
                                       double layernorm_epsilon, bool causal, bool prescaled_batch,
                                       int tp_size) {
  SMP_CHECK(config.num_attention_heads % tp_size == 0, ConfigError,
            "DistributedTransformerLayer: num_attention_heads (", config.num_attention_heads,
            ") must be divisible by tensor_parallel_degree (", tp_size,
            ") so that every tp rank holds whole heads; change one of them");
  SMP_CHECK(activation == "gelu" || activation == "gelu_tanh" || activation == "relu",
            ConfigError,
            "DistributedTransformerLayer: activation must be \"gelu\", \"gelu_tanh\" or "
            "\"relu\", got \"",
            activation, "\"");
  SMP_CHECK(attention_dropout >= 0.0 && attention_dropout < 1.0 && hidden_dropout >= 0.0 &&
                hidden_dropout < 1.0,
            ConfigError, "DistributedTransformerLayer: dropout probabilities must be in [0, 1), "
            "got attention_dropout_prob ", attention_dropout, " and hidden_dropout_prob ",
            hidden_dropout);
  TransformerOptions o;
  o.local_heads = config.num_attention_heads / tp_size;
  o.head_size = config.attention_head_size;
  o.attention_dropout = attention_dropout;
  o.hidden_dropout = hidden_dropout;
  o.activation = activation;
  o.layernorm_epsilon = layernorm_epsilon;
  o.pre_layernorm = config.pre_layernorm;
  o.post_layernorm = config.post_layernorm;
  o.causal = causal;
  o.prescaled_batch = prescaled_batch;
  return o;
}

DistributedTransformerLayerImpl::DistributedTransformerLayerImpl(
    const DistributedTransformerLayerOptions& options)
    : options_(options) {
  forward_options_ = transformer_options(
      options.config, options.attention_dropout_prob, options.hidden_dropout_prob,
      options.activation, options.layernorm_epsilon, options.causal_mask_size.has_value(),
      config().prescaled_batch, tp_size());
  build(transformer_layout(options.config), options.seed);
}

at::Tensor DistributedTransformerLayerImpl::forward(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& mask) {
  SMP_CHECK(!options_.causal_mask_size || x.dim() < 2 || x.size(1) <= *options_.causal_mask_size,
            ConfigError, "DistributedTransformerLayer: sequence length ", x.size(1),
            " exceeds causal_mask_size ", *options_.causal_mask_size);
  TransformerOptions o = forward_options_;
  o.training = is_training();
  const TransformerWeights w = transformer_weights(
      [this](const std::string& name) { return local(name); }, o.pre_layernorm, o.post_layernorm);
  return transformer_layer_forward(x, mask, w, o);
}

std::vector<ParamInfo> param_infos(torch::nn::Module& module, const std::string& who,
                                   const std::string& prefix) {
  // Shard specs of the parameters of tensor-parallel modules, by full name.
  std::map<std::string, std::pair<ShardSpec, bool>> specs;
  for (const auto& m : module.named_modules()) {
    auto* sharded = dynamic_cast<ShardedModule*>(m.value().get());
    if (sharded == nullptr) continue;
    const std::string at = m.key().empty() ? "" : m.key() + ".";
    for (const auto& s : sharded->shard_specs()) {
      const bool distributed = find_layout(sharded->layouts(), s.first).distributed();
      specs.emplace(at + s.first, std::make_pair(s.second, distributed));
    }
  }
  std::vector<ParamInfo> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    ParamInfo info;
    info.name = prefix + p.key();
    info.param = p.value();
    const auto found = specs.find(p.key());
    if (found != specs.end()) {
      info.spec = found->second.first;
      info.tp_module = found->second.second;
    } else {
      info.spec = ShardSpec::replicated(p.value().sizes().vec());
    }
    SMP_CHECK(p.value().sizes().vec() == info.spec.local_shape(), ConfigError, who,
              ": parameter '", info.name, "' has shape ", p.value().sizes(), " on rank ", rank(), " (tp_rank ",
              tp_rank(), ") but its shard spec ", info.spec.describe(), " expects ",
              at::IntArrayRef(info.spec.local_shape()),
              "; do not resize the parameters of tensor-parallel modules");
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace smp::nn
