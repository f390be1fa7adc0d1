"""Tensor parallelism for Hugging Face GPT-2: GPT2Block -> DistributedGPT2Block
(an smp.nn.DistributedTransformerLayer with pre-LayerNorm, causal attention
and GPT-2's activation), and smp v1's translation functions.

    with smp.tensor_parallelism():
        model = GPT2LMHeadModel(config)
    model = smp.DistributedModel(model)      # every GPT2Block is replaced

    hf = translate_state_dict_to_hf_gpt2(smp_state_dict)         # smp -> HF names
    sd = translate_hf_state_dict_to_smdistributed_gpt2(hf)        # HF -> smp names
"""

import torch

from smp.nn.huggingface import common, translate

_WHO = "GPT-2 (GPT2Block)"


def layer_kwargs(config):
    """DistributedTransformerLayer keywords of a GPT2Config; refuses options
    smp's layer does not compute."""
    if getattr(config, "add_cross_attention", False):
        common.refuse(_WHO, "add_cross_attention=True", "build the config without it")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        common.refuse(_WHO, "scale_attn_by_inverse_layer_idx=True", "set it to False")
    if not getattr(config, "scale_attn_weights", True):
        common.refuse(_WHO, "scale_attn_weights=False", "set it to True")
    hidden = config.hidden_size
    heads = config.num_attention_heads
    inner = config.n_inner if getattr(config, "n_inner", None) is not None else 4 * hidden
    return dict(
        num_attention_heads=heads, attention_head_size=hidden // heads, hidden_size=hidden,
        intermediate_size=inner, attention_dropout_prob=config.attn_pdrop,
        hidden_dropout_prob=config.resid_pdrop,
        activation=common.activation(_WHO, config.activation_function, "activation_function"),
        layernorm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range, use_normal_initialization=True,
        causal_mask_size=config.max_position_embeddings, pre_layernorm=True,
        post_layernorm=False)


class DistributedGPT2Block(common.HFLayer):
    """Hugging Face's GPT2Block across TP_GROUP: attention heads and MLP units
    split as in smp.nn.DistributedTransformerLayer (parameter names are that
    layer's; smp.state.module_manager.translate_functions maps them to
    GPT-2's). Takes GPT2Block's call (hidden_states, cache, attention_mask,
    ...) and returns what GPT2Block returns. Not supported: cross-attention,
    head masks, output_attentions, filling a key/value cache."""

    _smp_hf_kind = "gpt2"
    layer_kwargs = staticmethod(layer_kwargs)

    @staticmethod
    def hf_attention(module):
        return module.attn

    def forward(self, hidden_states, cache=None, attention_mask=None, *args, use_cache=False,
                **kwargs):
        common.check_extras(_WHO, args, kwargs)
        if cache is not None:
            common.warn_cache(_WHO)
        mask = common.additive_mask(_WHO, attention_mask, hidden_states.dtype)
        out = super().forward(hidden_states, mask)
        return common.layer_output(out, use_cache)


def translate_state_dict_to_hf_gpt2(state_dict, max_seq_len=None):
    """smp v1's function: a full smp state dict (every GPT-2 block in
    DistributedTransformerLayer names) in Hugging Face GPT-2's names.
    ``max_seq_len``: also add the causal-mask buffers ``attn.bias`` /
    ``attn.masked_bias`` that transformers before 4.x's non-persistent masks
    keep in the state dict (None: add none, for current transformers)."""
    extra = None
    if max_seq_len is not None:
        n = int(max_seq_len)
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        prefixes = translate._prefixes(state_dict, "attention.query.weight",
                                       "attention.pre_layernorm.weight")
        extra = {p: {"attn.bias": mask, "attn.masked_bias": torch.tensor(-1e4)}
                 for p in prefixes}
    return translate.to_hf(state_dict, "gpt2", None, extra)


def translate_hf_state_dict_to_smdistributed_gpt2(state_dict):
    """smp v1's function: a Hugging Face GPT-2 state dict in smp's names (the
    blocks' causal-mask buffers, if any, are dropped)."""
    prefixes = translate._prefixes(state_dict, "attn.c_attn.weight")
    extra = {p: {k: None for k in ("attn.bias", "attn.masked_bias") if p + k in state_dict}
             for p in prefixes}
    return translate.to_smp(state_dict, "gpt2", prefixes, extra)


__all__ = ["DistributedGPT2Block", "translate_state_dict_to_hf_gpt2",
           "translate_hf_state_dict_to_smdistributed_gpt2"]
