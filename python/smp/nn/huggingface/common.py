"""What the Hugging Face layer replacements share: the transformers version's
calling conventions, masks, activations and unsupported options."""

import logging
import sys

import torch

from smp import _C
from smp.nn.huggingface import translate
from smp.nn.transformer import DistributedTransformerLayer

logger = logging.getLogger("smp.nn.huggingface")

# Hugging Face activation name -> smp.nn transformer activation.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def transformers_major():
    """The major version of the transformers the program imported (5 when
    unknown); smp imports no transformers itself."""
    mod = sys.modules.get("transformers")
    try:
        return int(str(getattr(mod, "__version__", "5")).split(".")[0])
    except ValueError:
        return 5


def activation(who, name, key):
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise _C.NotSupportedError(
            f"smp tensor parallelism for {who}: the config's {key}={name!r} has no smp.nn "
            f"counterpart (supported: {sorted(ACTIVATIONS)}); change it, or keep these layers "
            "whole: smp.set_tensor_parallelism(layer, False)")
    return ACTIVATIONS[name]


def refuse(who, what, fix):
    raise _C.NotSupportedError(
        f"smp tensor parallelism for {who}: {what} is not supported; {fix}, or keep these "
        "layers whole: smp.set_tensor_parallelism(layer, False) (or create them under "
        "smp.tensor_parallelism(enabled=False))")


def additive_mask(who, mask, dtype):
    """The Hugging Face layer's attention mask as smp's layers take it: an
    additive float mask (0 keep, large negative drop), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise _C.NotSupportedError(
            f"{who}: the attention mask is a {type(mask).__name__}; smp's tensor-parallel layers "
            "take tensors: build the model with attn_implementation='eager' or 'sdpa'")
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return out.masked_fill(~mask, torch.finfo(dtype).min)
    if not mask.is_floating_point():
        raise _C.ConfigError(
            f"{who}: the attention mask reaching the layer has dtype {mask.dtype}; expected the "
            "4-D boolean or additive float mask Hugging Face's model builds")
    return mask.to(dtype)


_cache_warned = set()


def warn_cache(who):
    if who not in _cache_warned:
        _cache_warned.add(who)
        logger.warning(
            "smp: %s received a key/value cache; smp's tensor-parallel layers do not fill it "
            "(training needs none: build the model with use_cache=False; generation with a "
            "cache is not supported)", who)


def check_extras(who, args, kwargs):
    """Refuses the layer inputs smp's layers cannot honour."""
    if any(a is not None for a in args):
        refuse(who, "passing encoder states (cross-attention) or a head mask",
               "call the model without encoder_hidden_states and head_mask")
    for key in ("encoder_hidden_states", "head_mask"):
        if kwargs.get(key) is not None:
            refuse(who, f"'{key}'", f"call the model without {key}")
    if kwargs.get("output_attentions"):
        refuse(who, "output_attentions=True", "call the model with output_attentions=False")
    for key in ("layer_past", "past_key_value", "past_key_values", "cache"):
        if kwargs.get(key) is not None:
            warn_cache(who)


def hf_buffers(module):
    """Persistent buffers of a Hugging Face layer (older transformers keep
    attention masks there): {name: tensor}; they travel in the full state
    dict next to the translated layer."""
    out = {}
    for name, buf in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in owner._non_persistent_buffers_set:
            out[name] = buf.detach().clone()
    return out


def layer_output(out, use_cache=False):
    """What the Hugging Face layer returns: a tensor (transformers >= 5) or a tuple."""
    if transformers_major() >= 5:
        return out
    return (out, None) if use_cache else (out,)


class HFLayer(DistributedTransformerLayer):
    """What the Hugging Face layer replacements share: built from the HF
    config through the subclass's ``layer_kwargs``, and from an HF module by
    translating its state dict (``_smp_hf_kind``) and loading this rank's part.
    A subclass sets ``_smp_hf_kind``, ``layer_kwargs`` (config -> keywords) and
    ``hf_attention`` (module -> its attention module, which holds the config
    and layer_idx)."""

    _smp_hf_kind = None

    def __init__(self, config, layer_idx=None, attention_in_fp32=False, seed=None, dtype=None,
                 device=None):
        super().__init__(**type(self).layer_kwargs(config), attention_in_fp32=attention_in_fp32,
                         seed=seed, dtype=dtype, device=device)
        self.layer_idx = layer_idx
        self._smp_hf_buffers = {}

    @classmethod
    def from_module(cls, module, attention_in_fp32=False):
        """This rank's part of the HF layer ``module`` (same dtype and device)."""
        first = next(module.parameters())
        attn = cls.hf_attention(module)
        out = cls(attn.config, getattr(attn, "layer_idx", None),
                  attention_in_fp32=attention_in_fp32, seed=0, dtype=first.dtype,
                  device=first.device)
        full = translate.to_smp(module.state_dict(), cls._smp_hf_kind, [""])
        for name in out._smp_full_param_names():
            out._smp_load_full(name, full[name])
        out._smp_hf_buffers = hf_buffers(module)
        return out

    def extra_repr(self):
        return f"{self._smp_hf_kind}, {super().extra_repr()}"
