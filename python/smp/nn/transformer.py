"""smp.nn.DistributedTransformerLayer: attention + MLP split across TP_GROUP."""

from smp import _C
from smp._runtime import tp_size
from smp.nn.base import DistributedModule, _require_init


class DistributedTransformerLayer(DistributedModule):
    """One transformer layer (self-attention, then MLP), split across TP_GROUP:
    query/key/value and ``output.dense1`` by output (heads, intermediate units),
    ``attention.dense`` and ``output.dense2`` by input, LayerNorms replicated.
    num_attention_heads must be divisible by the tensor-parallel degree; the
    intermediate size need not be.

    Parameter names (as smp v1's): ``attention.{query,key,value,dense}.{weight,bias}``,
    ``output.{dense1,dense2}.{weight,bias}``, and per sublayer ``attention.``/``output.``
    ``pre_layernorm.*`` (pre_layernorm: x + f(LN(x))) and ``layernorm.*``
    (post_layernorm: LN(x + f(x))). ``attention.dense.bias`` and
    ``output.dense2.bias`` live on tp rank 0 only.

    ``forward(hidden_states, attention_mask=None)`` with hidden_states
    ``[batch, seq, hidden_size]`` and an additive float mask broadcastable to
    ``[batch, 1, seq, seq]``; or, as smp v1, ``forward((hidden_states,
    attention_mask))`` returning ``(output, attention_mask)``.
    ``causal_mask_size``: causal attention for sequences up to that length.
    """

    def __init__(self, num_attention_heads=32, attention_head_size=32, hidden_size=1024,
                 intermediate_size=4096, attention_dropout_prob=0.1, hidden_dropout_prob=0.1,
                 activation="gelu", layernorm_epsilon=1e-5, initializer_range=0.02,
                 pre_layernorm=False, post_layernorm=True, causal_mask_size=None, seed=None,
                 dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        self.num_attention_heads = int(num_attention_heads)
        self.attention_head_size = int(attention_head_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.causal_mask_size = None if causal_mask_size is None else int(causal_mask_size)
        layouts = _C.nn.transformer_layout(
            self.num_attention_heads, self.attention_head_size, self.hidden_size,
            self.intermediate_size, bool(pre_layernorm), bool(post_layernorm),
            float(initializer_range),
        )
        self._options = _C.nn.transformer_options(
            self.num_attention_heads, self.attention_head_size, bool(pre_layernorm),
            bool(post_layernorm), float(attention_dropout_prob), float(hidden_dropout_prob),
            str(activation), float(layernorm_epsilon), self.causal_mask_size is not None,
            False, tp_size(),
        )
        self._smp_build(layouts, seed, dtype, device)
        self._options.prescaled_batch = self._smp_prescaled_batch

    def forward(self, hidden_states, attention_mask=None):
        as_tuple = isinstance(hidden_states, (tuple, list))
        if as_tuple:
            hidden_states, attention_mask = hidden_states
        if (self.causal_mask_size is not None and hidden_states.dim() >= 2
                and hidden_states.shape[1] > self.causal_mask_size):
            raise _C.ConfigError(
                f"DistributedTransformerLayer: sequence length {hidden_states.shape[1]} exceeds "
                f"causal_mask_size {self.causal_mask_size}"
            )
        self._options.training = self.training
        out = _C.nn.transformer_layer_forward(
            hidden_states, attention_mask, dict(self.named_parameters()), self._options
        )
        return (out, attention_mask) if as_tuple else out

    def extra_repr(self):
        return (f"heads={self.num_attention_heads}x{self.attention_head_size}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"tp_size={tp_size()}")
