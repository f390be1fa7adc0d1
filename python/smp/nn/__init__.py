"""smp.nn: tensor-parallel modules (smp v1's smp.nn).

    import smp
    smp.init({"tensor_parallel_degree": 2, "ddp": True})
    fc = smp.nn.DistributedLinear(1024, 4096)
    emb = smp.nn.DistributedEmbedding(50000, 1024, vocab_parallel=True)
    layer = smp.nn.DistributedTransformerLayer(num_attention_heads=16, attention_head_size=64,
                                               hidden_size=1024, intermediate_size=4096)
    lm = smp.nn.DistributedTransformerLMHead(num_layers=12, num_attention_heads=12,
                                             attention_head_size=64, hidden_size=768,
                                             intermediate_size=3072, vocab_size=50257,
                                             pre_layernorm=True, post_layernorm=True,
                                             causal_mask_size=1024)

The communicating autograd functions the modules are built on are in
smp.nn.functional.
"""

from smp.nn import functional
from smp.nn.base import DistributedContainer, DistributedModule
from smp.nn.embedding import DistributedEmbedding
from smp.nn.layer_norm import FusedLayerNorm
from smp.nn.linear import DistributedLinear
from smp.nn.transformer import (
    DistributedAttentionLayer,
    DistributedTransformer,
    DistributedTransformerLayer,
    DistributedTransformerLMHead,
    DistributedTransformerOutputLayer,
)

__all__ = [
    "DistributedModule",
    "DistributedContainer",
    "DistributedLinear",
    "DistributedEmbedding",
    "DistributedTransformerLayer",
    "DistributedAttentionLayer",
    "DistributedTransformerOutputLayer",
    "DistributedTransformer",
    "DistributedTransformerLMHead",
    "FusedLayerNorm",
    "functional",
]

# smp v1 names smp does not implement: constructing one raises
# smp.NotSupportedError naming the alternative (a real module of the same name wins).
from smp.nn import _unsupported  # noqa: E402

for _name, _stub in _unsupported.STUBS.items():
    globals().setdefault(_name, _stub)
del _name, _stub

# Hugging Face layers (imports no transformers): smp.nn.huggingface.gpt2, .bert.
from smp.nn import huggingface  # noqa: E402
