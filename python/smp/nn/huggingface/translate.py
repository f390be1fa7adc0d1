"""State-dict translation between Hugging Face transformer layers and smp's
distributed transformer layers (full, unsplit tensors), and the translator
objects smp.DistributedModel registers in smp.state.module_manager.translate_functions.

Every layer is found by its keys: a prefix P is a GPT-2 block in smp's names
when P + "attention.query.weight" and P + "attention.pre_layernorm.weight"
exist, a BERT layer when P + "attention.query.weight" and
P + "attention.layernorm.weight" exist; in Hugging Face's names when
P + "attn.c_attn.weight" (GPT-2) or P + "attention.self.query.weight" (BERT)
exist. Keys of other layers pass through unchanged, so each translation is
idempotent and may be applied to a dict already in the target names.

GPT-2's Conv1D stores weights as (in, out), smp's layers as torch.nn.Linear
(out, in); its fused c_attn holds query, key and value side by side.
"""

import collections

import torch

# BERT: pure renames, smp name -> Hugging Face name, within a layer.
_BERT = (
    ("attention.query.", "attention.self.query."),
    ("attention.key.", "attention.self.key."),
    ("attention.value.", "attention.self.value."),
    ("attention.dense.", "attention.output.dense."),
    ("attention.layernorm.", "attention.output.LayerNorm."),
    ("output.dense1.", "intermediate.dense."),
    ("output.dense2.", "output.dense."),
    ("output.layernorm.", "output.LayerNorm."),
)
_BERT_HF_ORDER = [hf + leaf for _, hf in _BERT for leaf in ("weight", "bias")]
_BERT_SMP = [smp + leaf for smp, _ in _BERT for leaf in ("weight", "bias")]

# GPT-2: smp names of one layer (pre_layernorm=True, post_layernorm=False).
_GPT2_SMP = [
    "attention.pre_layernorm.weight", "attention.pre_layernorm.bias",
    "attention.query.weight", "attention.query.bias", "attention.key.weight",
    "attention.key.bias", "attention.value.weight", "attention.value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "output.pre_layernorm.weight", "output.pre_layernorm.bias",
    "output.dense1.weight", "output.dense1.bias", "output.dense2.weight", "output.dense2.bias",
]
_GPT2_HF = [
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
]

KINDS = ("gpt2", "bert")


def _t(w):
    return w.t().contiguous()


def _gpt2_to_hf(get):
    q, k, v = (get(f"attention.{n}.weight") for n in ("query", "key", "value"))
    return {
        "ln_1.weight": get("attention.pre_layernorm.weight"),
        "ln_1.bias": get("attention.pre_layernorm.bias"),
        "attn.c_attn.weight": _t(torch.cat([q, k, v], 0)),
        "attn.c_attn.bias": torch.cat([get(f"attention.{n}.bias")
                                       for n in ("query", "key", "value")], 0),
        "attn.c_proj.weight": _t(get("attention.dense.weight")),
        "attn.c_proj.bias": get("attention.dense.bias"),
        "ln_2.weight": get("output.pre_layernorm.weight"),
        "ln_2.bias": get("output.pre_layernorm.bias"),
        "mlp.c_fc.weight": _t(get("output.dense1.weight")),
        "mlp.c_fc.bias": get("output.dense1.bias"),
        "mlp.c_proj.weight": _t(get("output.dense2.weight")),
        "mlp.c_proj.bias": get("output.dense2.bias"),
    }


def _gpt2_to_smp(get):
    w = get("attn.c_attn.weight")          # (hidden, 3 * hidden)
    b = get("attn.c_attn.bias")
    hidden = w.shape[0]
    q, k, v = (_t(x) for x in w.split(hidden, 1))
    qb, kb, vb = (x.contiguous() for x in b.split(hidden, 0))
    return {
        "attention.pre_layernorm.weight": get("ln_1.weight"),
        "attention.pre_layernorm.bias": get("ln_1.bias"),
        "attention.query.weight": q, "attention.query.bias": qb,
        "attention.key.weight": k, "attention.key.bias": kb,
        "attention.value.weight": v, "attention.value.bias": vb,
        "attention.dense.weight": _t(get("attn.c_proj.weight")),
        "attention.dense.bias": get("attn.c_proj.bias"),
        "output.pre_layernorm.weight": get("ln_2.weight"),
        "output.pre_layernorm.bias": get("ln_2.bias"),
        "output.dense1.weight": _t(get("mlp.c_fc.weight")),
        "output.dense1.bias": get("mlp.c_fc.bias"),
        "output.dense2.weight": _t(get("mlp.c_proj.weight")),
        "output.dense2.bias": get("mlp.c_proj.bias"),
    }


def _bert_to_hf(get):
    return {hf + leaf: get(smp + leaf) for smp, hf in _BERT for leaf in ("weight", "bias")}


def _bert_to_smp(get):
    return {smp + leaf: get(hf + leaf) for smp, hf in _BERT for leaf in ("weight", "bias")}


# kind -> (marker key in smp names, extra smp marker, converter smp -> HF,
#          marker key in HF names, converter HF -> smp, smp keys, HF keys)
_SPEC = {
    "gpt2": ("attention.query.weight", "attention.pre_layernorm.weight", _gpt2_to_hf,
             "attn.c_attn.weight", _gpt2_to_smp, _GPT2_SMP, _GPT2_HF),
    "bert": ("attention.query.weight", "attention.layernorm.weight", _bert_to_hf,
             "attention.self.query.weight", _bert_to_smp, _BERT_SMP, _BERT_HF_ORDER),
}


def _prefixes(state_dict, marker, extra=None):
    out = []
    for key in state_dict:
        if key.endswith(marker):
            p = key[:-len(marker)]
            if (p == "" or p.endswith(".")) and (extra is None or p + extra in state_dict):
                out.append(p)
    return out


def _convert(state_dict, kind, prefixes, to_hf, extra_buffers=None):
    """A new dict with the layers at ``prefixes`` converted (see module
    docstring); each converted layer's keys take the place of its first key."""
    smp_marker, smp_extra, fwd, hf_marker, back, smp_keys, hf_keys = _SPEC[kind]
    src_keys = smp_keys if to_hf else hf_keys
    if prefixes is None:
        prefixes = (_prefixes(state_dict, smp_marker, smp_extra) if to_hf
                    else _prefixes(state_dict, hf_marker))
    present = [p for p in prefixes
               if p + (smp_marker if to_hf else hf_marker) in state_dict]
    if not present:
        return state_dict
    owner = {}
    for p in present:
        for k in src_keys:
            owner[p + k] = p
        for name in (extra_buffers or {}).get(p, {}):
            if not to_hf:
                owner[p + name] = p      # the layer's HF-only buffers: dropped
    out = collections.OrderedDict()
    done = set()
    for key, value in state_dict.items():
        p = owner.get(key)
        if p is None:
            out[key] = value
            continue
        if p in done:
            continue
        done.add(p)
        try:
            converted = (fwd if to_hf else back)(lambda name, p=p: state_dict[p + name])
        except KeyError:
            # An incomplete layer stays as it is: a strict load names its keys.
            converted = None
        if converted is None:
            for k, v in state_dict.items():
                if owner.get(k) == p:
                    out[k] = v
            continue
        for name, t in converted.items():
            out[p + name] = t
        if to_hf:
            for name, t in (extra_buffers or {}).get(p, {}).items():
                out[p + name] = t
    return out


def to_hf(state_dict, kind, prefixes=None, extra_buffers=None):
    """smp names -> Hugging Face names for the ``kind`` layers at ``prefixes``
    (None: every layer found by its keys). ``extra_buffers``: {prefix: {name:
    tensor}} of persistent buffers the Hugging Face layer has and smp's does
    not (older transformers' attention masks), added after each layer."""
    return _convert(state_dict, kind, prefixes, True, extra_buffers)


def to_smp(state_dict, kind, prefixes=None, extra_buffers=None):
    """Hugging Face names -> smp names (see to_hf); the extra buffers are dropped."""
    return _convert(state_dict, kind, prefixes, False, extra_buffers)


class HFTranslator:
    """One model's translation: ``translator(state_dict)`` turns smp's full
    state dict into the Hugging Face model's names, ``translator.inverse(state_dict)``
    the other way. smp.DistributedModel registers one per Hugging Face layer
    type it replaced, in smp.state.module_manager.translate_functions."""

    def __init__(self, kind, prefixes, extra_buffers=None):
        if kind not in _SPEC:
            raise ValueError(f"unknown layer kind {kind!r}; one of {KINDS}")
        self.kind = kind
        self.prefixes = list(prefixes)
        self.extra_buffers = dict(extra_buffers or {})

    def __call__(self, state_dict):
        return to_hf(state_dict, self.kind, self.prefixes, self.extra_buffers)

    def inverse(self, state_dict):
        return to_smp(state_dict, self.kind, self.prefixes, self.extra_buffers)

    def __repr__(self):
        return f"smp.nn.huggingface.HFTranslator({self.kind!r}, {len(self.prefixes)} layers)"
