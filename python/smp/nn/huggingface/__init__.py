"""smp.nn.huggingface: tensor parallelism for Hugging Face transformers, as smp v1's
smp.nn.huggingface (docs/api.md, "Hugging Face models").

With tp_size() > 1, smp.DistributedModel replaces the marked layers of these
types (smp.tensor_parallelism / smp.set_tensor_parallelism) by smp.nn
distributed transformer layers:

    transformers GPT2Block     -> smp.nn.huggingface.gpt2.DistributedGPT2Block
    transformers BertLayer     -> smp.nn.huggingface.bert.DistributedBertLayer
    transformers RobertaLayer  -> the same (smp.nn.huggingface.roberta)

and registers, per replaced layer type, an HFTranslator in
smp.state.module_manager.translate_functions: model.state_dict() translates
the full state dict back to the Hugging Face names (loadable by the plain
model with strict=True, and by save_pretrained(state_dict=...)) and
model.load_state_dict() takes a Hugging Face state dict.

transformers is imported only by the user: the entries exist once the
user's program has imported the modeling module of a type (as building the
model does).
"""

import sys

from smp import _runtime, _state
from smp.nn.huggingface import bert, gpt2, roberta
from smp.nn.huggingface.translate import HFTranslator

# modeling module, class name -> distributed class
_TYPES = (
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Block", gpt2.DistributedGPT2Block),
    ("transformers.models.bert.modeling_bert", "BertLayer", bert.DistributedBertLayer),
    ("transformers.models.roberta.modeling_roberta", "RobertaLayer", bert.DistributedBertLayer),
)


def builtin_entries():
    """{Hugging Face layer class: smp distributed class} for the modeling
    modules the program has imported (imports nothing)."""
    out = {}
    for module_name, cls_name, dist_cls in _TYPES:
        mod = sys.modules.get(module_name)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        if cls is not None:
            out[cls] = dist_cls
    return out


# The translators smp registered (removed from the list at smp.shutdown).
_registered = []


def register_translators(root):
    """Appends one HFTranslator per Hugging Face layer kind that smp replaced
    under ``root`` to smp.state.module_manager.translate_functions (prefixes
    relative to root, the names of the model's state dict). Returns them."""
    found = {}
    buffers = {}
    for name, m in root.named_modules():
        kind = getattr(type(m), "_smp_hf_kind", None)
        if kind is None:
            continue
        prefix = name + "." if name else ""
        found.setdefault(kind, []).append(prefix)
        extra = getattr(m, "_smp_hf_buffers", None)
        if extra:
            buffers.setdefault(kind, {})[prefix] = extra
    fns = _state.state.module_manager.translate_functions
    new = []
    for kind, prefixes in found.items():
        t = HFTranslator(kind, prefixes, buffers.get(kind))
        fns.append(t)
        _registered.append(t)
        new.append(t)
    return new


def _forget():
    fns = _state.state.module_manager.translate_functions
    for t in _registered:
        for i, fn in enumerate(fns):
            if fn is t:
                del fns[i]
                break
    _registered.clear()


_runtime.register_shutdown_hook(_forget)

__all__ = ["bert", "gpt2", "roberta", "HFTranslator", "builtin_entries",
           "register_translators"]
