"""Tensor parallelism for Hugging Face BERT: BertLayer -> DistributedBertLayer
(an smp.nn.DistributedTransformerLayer with post-LayerNorm: self-attention,
intermediate and output in one layer), and smp v1's translation functions.

    with smp.tensor_parallelism():
        model = BertForMaskedLM(config)
    model = smp.DistributedModel(model)      # every BertLayer is replaced

    hf = translate_state_dict_to_hf_bert(smp_state_dict)         # smp -> HF names
    sd = translate_hf_state_dict_to_smdistributed_bert(hf)        # HF -> smp names
"""

from smp.nn.huggingface import common, translate

_WHO = "BERT (BertLayer, RobertaLayer)"


def layer_kwargs(config):
    """DistributedTransformerLayer keywords of a BertConfig; refuses options
    smp's layer does not compute."""
    if getattr(config, "add_cross_attention", False):
        common.refuse(_WHO, "add_cross_attention=True", "build the config without it")
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        common.refuse(_WHO, f"position_embedding_type={config.position_embedding_type!r}",
                      "use 'absolute'")
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return dict(
        num_attention_heads=heads, attention_head_size=hidden // heads, hidden_size=hidden,
        intermediate_size=config.intermediate_size,
        attention_dropout_prob=config.attention_probs_dropout_prob,
        hidden_dropout_prob=config.hidden_dropout_prob,
        activation=common.activation(_WHO, config.hidden_act, "hidden_act"),
        layernorm_epsilon=config.layer_norm_eps, initializer_range=config.initializer_range,
        use_normal_initialization=True,
        causal_mask_size=config.max_position_embeddings if config.is_decoder else None,
        pre_layernorm=False, post_layernorm=True)


class DistributedBertLayer(common.HFLayer):
    """Hugging Face's BertLayer across TP_GROUP (parameter names are
    smp.nn.DistributedTransformerLayer's; smp.state.module_manager.translate_functions
    maps them to BERT's). Takes BertLayer's call (hidden_states,
    attention_mask, ...) and returns what BertLayer returns. Not supported:
    cross-attention, head masks, output_attentions, filling a key/value cache."""

    _smp_hf_kind = "bert"
    layer_kwargs = staticmethod(layer_kwargs)

    @staticmethod
    def hf_attention(module):
        return module.attention.self

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        common.check_extras(_WHO, args, kwargs)
        mask = common.additive_mask(_WHO, attention_mask, hidden_states.dtype)
        out = super().forward(hidden_states, mask)
        return common.layer_output(out)


def translate_state_dict_to_hf_bert(state_dict, max_seq_len=None):
    """smp v1's function: a full smp state dict (every BERT layer in
    DistributedTransformerLayer names) in Hugging Face BERT's names.
    ``max_seq_len`` is accepted for smp v1's signature (BERT keeps no
    per-layer mask buffers)."""
    del max_seq_len
    return translate.to_hf(state_dict, "bert")


def translate_hf_state_dict_to_smdistributed_bert(state_dict):
    """smp v1's function: a Hugging Face BERT state dict in smp's names."""
    return translate.to_smp(state_dict, "bert")


__all__ = ["DistributedBertLayer", "translate_state_dict_to_hf_bert",
           "translate_hf_state_dict_to_smdistributed_bert"]
