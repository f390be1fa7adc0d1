"""smp v1's distributed transformer modules, split across TP_GROUP:

- DistributedTransformerLayer: attention + MLP (one engine call, smp/nn/layers.h);
- DistributedAttentionLayer, DistributedTransformerOutputLayer: the two halves
  on their own (self- or cross-attention; the MLP);
- DistributedTransformer: num_layers DistributedTransformerLayers (``seq_layers``);
- DistributedTransformerLMHead: embeddings + DistributedTransformer + an LM head
  tied to the word embedding.

Constructors take smp v1's arguments in v1's order. Query/key/value and the
first MLP projection are split by output (heads, intermediate units), the
attention output and second MLP projection by input, LayerNorms replicated.
num_attention_heads must be divisible by the tensor-parallel degree (smp v1
splits heads unevenly; here that raises ConfigError naming both numbers).
Keywords of smp v1 that select CUDA kernels or fp16 tricks
(``query_key_layer_scaling``, ``fused_softmax``, ``fused_bias_gelu``,
``fp32_residual_addition``, ``_scale_qkv_fan_out``, ``alibi_bias_max``) are
accepted and compute the same function; ``attention_in_fp32`` computes the
attention scores and softmax in float32. The forwards are the engine's
(smp/nn/layers.h: attention_forward, mlp_forward, transformer_layer_forward).

Initialization: ``use_normal_initialization=False`` (v1's default) draws the
projections as torch.nn.Linear does (U(+-1/sqrt(fan_in)), weights and biases);
True draws weights from N(0, initializer_range^2) with zero biases. Either way
one full tensor per parameter is drawn from ``seed`` (None: from torch's
generator, so seed torch alike on every rank) and each rank keeps its slice.
"""

import math

import torch

from smp import _C
from smp._runtime import tp_size
from smp.nn.base import DistributedContainer, DistributedModule, _require_init, _seed

_F = _C.nn


def _check_v1_options(who, rotary_dim=None, use_alibi=False, add_cross_attention=False):
    if rotary_dim is not None:
        raise _C.NotSupportedError(
            f"smp.nn.{who}: rotary_dim={rotary_dim!r} (rotary position embeddings) is not "
            "supported; pass rotary_dim=None")
    if use_alibi:
        raise _C.NotSupportedError(
            f"smp.nn.{who}: use_alibi=True is not supported; pass use_alibi=False")
    if add_cross_attention:
        raise _C.NotSupportedError(
            f"smp.nn.{who}: add_cross_attention=True is not supported; build the decoder from "
            "smp.nn.DistributedAttentionLayer(cross_attention=True) and "
            "smp.nn.DistributedTransformerOutputLayer instead")


def _layouts(heads, head_size, hidden, inter, pre, post, initializer_range, sublayer):
    """The engine's layouts of one sublayer ("attention" or "output") with a
    post LayerNorm when ``post`` (also together with ``pre``), as
    {name without the sublayer prefix: layout}."""
    prefix = sublayer + "."
    chosen = _F.transformer_layout(heads, head_size, hidden, inter, pre,
                                   post and (sublayer == "output" or not pre), initializer_range)
    if post and pre and sublayer == "attention":
        chosen += [p for p in _F.transformer_layout(heads, head_size, hidden, inter, False, True,
                                                     initializer_range)
                   if p.name.startswith("attention.layernorm.")]
    return {p.name[len(prefix):]: p for p in chosen if p.name.startswith(prefix)}


def _init(module, seed, use_normal):
    """Parameters as torch.nn.Linear initializes them (use_normal False):
    redraws every projection of ``module`` from ``seed``."""
    if use_normal:
        return
    g = torch.Generator().manual_seed(int(seed) + 1)
    names = module._smp_full_param_names()
    for name, info in names.items():
        if not name.endswith(".weight") or len(info["global_shape"]) != 2:
            continue
        shape = info["global_shape"]
        bound = 1.0 / math.sqrt(shape[1])
        module._smp_load_full(name, torch.empty(shape).uniform_(-bound, bound, generator=g))
        bias = name[:-len("weight")] + "bias"
        if bias in names:
            module._smp_load_full(
                bias, torch.empty(names[bias]["global_shape"]).uniform_(-bound, bound, generator=g))


class _Sublayer(DistributedModule):
    """Shared construction of the attention and output sublayers."""

    def _setup(self, layouts, seed, use_normal, dtype, device):
        seed = _seed(seed)
        names = list(layouts)
        values = list(layouts.values())
        self._smp_build(values, seed, dtype, device)
        # _smp_build registered the engine's names ("attention.query.weight"):
        # re-key to this module's own names.
        self._smp_layouts = {}
        for name, layout in zip(names, values):
            self._smp_layouts[name] = layout
        for module_name in ("attention", "output"):
            sub = self._modules.pop(module_name, None)
            if sub is not None:
                for child_name, child in sub.named_children():
                    self.add_module(child_name, child)
        _init(self, seed, use_normal)

    def _forward_options(self):
        self._options.training = self.training
        self._options.prescaled_batch = self._smp_prescaled_batch
        return self._options


class DistributedAttentionLayer(_Sublayer):
    """smp v1's attention block: LN (pre_layernorm) -> self- or cross-attention
    over this rank's heads -> output projection -> dropout -> residual add ->
    LN (post_layernorm). Parameters ``query``/``key``/``value``/``dense``
    ``.weight``/``.bias``, ``pre_layernorm.*``, ``layernorm.*``.

    ``forward((hidden_states, attention_mask))`` or, with cross_attention,
    ``forward((hidden_states, cross_states, attention_mask))``; hidden_states
    ``[N, S, H]`` (this rank's batch, or the TP group's shared batch with
    prescaled_batch), an additive float mask broadcastable to ``[N, 1, S, S_k]``
    (or None); returns one tensor ``[N, S, H]``.
    """

    def __init__(self, num_attention_heads=32, attention_head_size=32, hidden_size=1024,
                 attention_dropout_prob=0.1, hidden_dropout_prob=0.1, layernorm_epsilon=1e-5,
                 initializer_range=0.02, use_normal_initialization=False, cross_attention=False,
                 causal_mask_size=None, pre_layernorm=False, post_layernorm=True,
                 attention_in_fp32=False, query_key_layer_scaling=False,
                 fp32_residual_addition=False, fused_softmax=True, _scale_qkv_fan_out=False, *,
                 rotary_dim=None, use_alibi=False, alibi_bias_max=8, seed=None, dtype=None,
                 device=None):
        _require_init(type(self).__name__)
        super().__init__()
        _check_v1_options(type(self).__name__, rotary_dim, use_alibi)
        self.num_attention_heads = int(num_attention_heads)
        self.attention_head_size = int(attention_head_size)
        self.hidden_size = int(hidden_size)
        self.cross_attention = bool(cross_attention)
        self.causal_mask_size = None if causal_mask_size is None else int(causal_mask_size)
        pre_layernorm = bool(pre_layernorm)
        post_layernorm = bool(post_layernorm)
        self.attention_in_fp32 = bool(attention_in_fp32)
        # Checks the head split (and the other options) in the engine.
        self._options = _F.transformer_options(
            self.num_attention_heads, self.attention_head_size, pre_layernorm,
            post_layernorm, float(attention_dropout_prob), float(hidden_dropout_prob),
            "gelu", float(layernorm_epsilon),
            self.causal_mask_size is not None and not self.cross_attention, False, tp_size())
        self._options.attention_in_fp32 = self.attention_in_fp32
        self.local_attention_heads = self._options.local_heads
        layouts = _layouts(self.num_attention_heads, self.attention_head_size, self.hidden_size, 1,
                           pre_layernorm, post_layernorm, float(initializer_range),
                           "attention")
        self._setup(layouts, seed, use_normal_initialization, dtype, device)

    def forward(self, inputs):
        if self.cross_attention:
            hidden_states, cross_states, attention_mask = inputs
        else:
            (hidden_states, attention_mask), cross_states = inputs, None
        if (self.causal_mask_size is not None and not self.cross_attention
                and hidden_states.dim() >= 2 and hidden_states.shape[1] > self.causal_mask_size):
            raise _C.ConfigError(
                f"smp.nn.{type(self).__name__}: sequence length {hidden_states.shape[1]} "
                f"exceeds causal_mask_size {self.causal_mask_size}")
        return _F.attention_forward(hidden_states, cross_states, attention_mask,
                                    dict(self.named_parameters()), self._forward_options())

    def extra_repr(self):
        return (f"heads={self.num_attention_heads}x{self.attention_head_size}, "
                f"hidden={self.hidden_size}, cross_attention={self.cross_attention}, "
                f"tp_size={tp_size()}")


class DistributedTransformerOutputLayer(_Sublayer):
    """smp v1's MLP block: LN (pre_layernorm) -> dense1 (split by intermediate
    unit) -> activation ("gelu", "relu", or "gelu_tanh": GPT-2's gelu_new) ->
    dense2 -> dropout -> residual add -> LN (post_layernorm). Parameters
    ``dense1.*``, ``dense2.*``, ``pre_layernorm.*``, ``layernorm.*``.
    ``forward(hidden_states)`` -> ``[N, S, H]``."""

    def __init__(self, hidden_size=1024, intermediate_size=4096, hidden_dropout_prob=0.1,
                 activation="gelu", layernorm_epsilon=1e-5, initializer_range=0.02,
                 use_normal_initialization=False, pre_layernorm=False, post_layernorm=True,
                 fp32_residual_addition=False, fused_bias_gelu=False, *, seed=None, dtype=None,
                 device=None):
        _require_init(type(self).__name__)
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        pre_layernorm = bool(pre_layernorm)
        post_layernorm = bool(post_layernorm)
        self.activation = str(activation)
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self._options = _F.transformer_options(
            tp_size(), 1, pre_layernorm, post_layernorm, 0.0, self.hidden_dropout_prob,
            self.activation, float(layernorm_epsilon), False, False, tp_size())
        layouts = _layouts(tp_size(), 1, self.hidden_size, self.intermediate_size,
                           pre_layernorm, post_layernorm, float(initializer_range),
                           "output")
        self._setup(layouts, seed, use_normal_initialization, dtype, device)

    def forward(self, hidden_states):
        if hidden_states.dim() < 2 or hidden_states.shape[-1] != self.hidden_size:
            raise _C.ConfigError(
                f"smp.nn.{type(self).__name__}: the input must be [batch, ..., "
                f"{self.hidden_size}], got {tuple(hidden_states.shape)}")
        return _F.mlp_forward(hidden_states, dict(self.named_parameters()),
                              self._forward_options())

    def extra_repr(self):
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"activation={self.activation}, tp_size={tp_size()}")


class DistributedTransformerLayer(DistributedModule):
    """One transformer layer (self-attention, then MLP), split across TP_GROUP:
    query/key/value and ``output.dense1`` by output (heads, intermediate units),
    ``attention.dense`` and ``output.dense2`` by input, LayerNorms replicated.
    num_attention_heads must be divisible by the tensor-parallel degree; the
    intermediate size need not be.

    Parameter names (as smp v1's): ``attention.{query,key,value,dense}.{weight,bias}``,
    ``output.{dense1,dense2}.{weight,bias}``, and per sublayer ``attention.``/``output.``
    ``pre_layernorm.*`` (pre_layernorm: x + f(LN(x))) and ``layernorm.*``
    (post_layernorm: LN(x + f(x))); with both, as smp v1, only ``output.layernorm``
    (the layer's output). ``attention.dense.bias`` and ``output.dense2.bias``
    live on tp rank 0 only.

    ``forward(hidden_states, attention_mask=None)`` with hidden_states
    ``[batch, seq, hidden_size]`` and an additive float mask broadcastable to
    ``[batch, 1, seq, seq]``; or, as smp v1, ``forward((hidden_states,
    attention_mask))`` returning ``(output, attention_mask)``.
    ``causal_mask_size``: causal attention for sequences up to that length.
    """

    def __init__(self, num_attention_heads=32, attention_head_size=32, hidden_size=1024,
                 intermediate_size=4096, attention_dropout_prob=0.1, hidden_dropout_prob=0.1,
                 activation="gelu", layernorm_epsilon=1e-5, initializer_range=0.02,
                 use_normal_initialization=False, causal_mask_size=None,
                 add_cross_attention=False, pre_layernorm=False, post_layernorm=True,
                 attention_in_fp32=False, query_key_layer_scaling=False,
                 fp32_residual_addition=False, fused_softmax=True, fused_bias_gelu=False,
                 _scale_qkv_fan_out=False, *, rotary_dim=None, use_alibi=False, alibi_bias_max=8,
                 seed=None, dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        _check_v1_options(type(self).__name__, rotary_dim, use_alibi, add_cross_attention)
        self.num_attention_heads = int(num_attention_heads)
        self.attention_head_size = int(attention_head_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.pre_layernorm = bool(pre_layernorm)
        self.post_layernorm = bool(post_layernorm)
        self.causal_mask_size = None if causal_mask_size is None else int(causal_mask_size)
        layouts = _F.transformer_layout(
            self.num_attention_heads, self.attention_head_size, self.hidden_size,
            self.intermediate_size, self.pre_layernorm, self.post_layernorm,
            float(initializer_range),
        )
        self._options = _F.transformer_options(
            self.num_attention_heads, self.attention_head_size, self.pre_layernorm,
            self.post_layernorm, float(attention_dropout_prob), float(hidden_dropout_prob),
            str(activation), float(layernorm_epsilon), self.causal_mask_size is not None,
            False, tp_size(),
        )
        self._options.attention_in_fp32 = bool(attention_in_fp32)
        seed = _seed(seed)
        self._smp_build(layouts, seed, dtype, device)
        self._options.prescaled_batch = self._smp_prescaled_batch
        _init(self, seed, use_normal_initialization)

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
        out = _F.transformer_layer_forward(
            hidden_states, attention_mask, dict(self.named_parameters()), self._options
        )
        return (out, attention_mask) if as_tuple else out

    def extra_repr(self):
        return (f"heads={self.num_attention_heads}x{self.attention_head_size}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"tp_size={tp_size()}")


_LAYER_KEYS = (
    "num_attention_heads", "attention_head_size", "hidden_size", "intermediate_size",
    "attention_dropout_prob", "hidden_dropout_prob", "activation", "layernorm_epsilon",
    "initializer_range", "use_normal_initialization", "causal_mask_size", "add_cross_attention",
    "pre_layernorm", "post_layernorm", "attention_in_fp32", "query_key_layer_scaling",
    "fp32_residual_addition", "fused_softmax", "fused_bias_gelu", "_scale_qkv_fan_out",
    "rotary_dim", "use_alibi", "alibi_bias_max", "dtype", "device")


class DistributedTransformer(DistributedContainer):
    """``num_layers`` DistributedTransformerLayers in ``seq_layers`` (an
    nn.Sequential; parameters ``seq_layers.<i>.attention.query.weight`` ...).
    With both pre_layernorm and post_layernorm, as smp v1, every layer is
    pre-LN and only the last one has a post LayerNorm (the final LayerNorm of
    GPT-2). ``forward((hidden_states, attention_mask))`` returns
    ``(hidden_states, attention_mask)``."""

    def __init__(self, num_layers=12, num_attention_heads=32, attention_head_size=32,
                 hidden_size=1024, intermediate_size=4096, attention_dropout_prob=0.1,
                 hidden_dropout_prob=0.1, activation="gelu", layernorm_epsilon=1e-5,
                 initializer_range=0.02, use_normal_initialization=False, causal_mask_size=None,
                 add_cross_attention=False, pre_layernorm=False, post_layernorm=True,
                 attention_in_fp32=False, query_key_layer_scaling=False,
                 fp32_residual_addition=False, fused_softmax=True, fused_bias_gelu=False,
                 _scale_qkv_fan_out=False, *, rotary_dim=None, use_alibi=False, alibi_bias_max=8,
                 seed=None, dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        _check_v1_options(type(self).__name__, rotary_dim, use_alibi, add_cross_attention)
        if int(num_layers) < 1:
            raise _C.ConfigError(
                f"smp.nn.DistributedTransformer: num_layers must be positive, got {num_layers}")
        if not pre_layernorm and not post_layernorm:
            raise _C.ConfigError(
                "smp.nn.DistributedTransformer: at least one of pre_layernorm and post_layernorm "
                "must be True")
        self.num_layers = int(num_layers)
        values = dict(locals())
        config = {k: values[k] for k in _LAYER_KEYS}
        seed = _seed(seed)
        layers = []
        for i in range(self.num_layers):
            post = bool(post_layernorm) and (not pre_layernorm or i == self.num_layers - 1)
            layers.append(DistributedTransformerLayer(
                **{**config, "post_layernorm": post}, seed=seed + 7919 * i))
        self.seq_layers = torch.nn.Sequential(*layers)
        self.layers = layers  # smp v1 keeps this list too (not a registered child)

    def forward(self, inputs):
        return self.seq_layers(tuple(inputs))


class DistributedTransformerLMHead(DistributedContainer):
    """smp v1's transformer language model: word and position embeddings (and
    token-type embeddings when num_token_types > 0), dropout, a
    DistributedTransformer (``transformer``) and, with add_lm_head, a bias-free
    ``lm_head`` whose weight is the word embedding's. The embeddings and the
    head are replicated on every tp rank (smp v1's default,
    distribute_embedding=False); the transformer layers are split.

    ``forward((input_ids, attention_mask, token_type_ids, position_ids, labels))``:
    input_ids ``[N, S]``; attention_mask a 0/1 tensor ``[N, S]`` (1: attend,
    as Hugging Face) or None; token_type_ids None (or ids; without a token-type
    embedding they index the word embedding, as Hugging Face GPT-2);
    position_ids None (0..S-1) or ``[N, S]``; labels None or ``[N, S]``.
    Returns the logits ``[N, S, vocab_size]``, or with labels ``(loss, logits)``
    where loss is the mean cross entropy of predicting token t+1 from t.
    """

    def __init__(self, num_layers=12, num_attention_heads=32, attention_head_size=32,
                 hidden_size=1024, intermediate_size=4096, vocab_size=30522, num_positions=1024,
                 attention_dropout_prob=0.1, hidden_dropout_prob=0.1, activation="gelu",
                 layernorm_epsilon=1e-5, num_token_types=0, causal_mask_size=None,
                 add_cross_attention=False, add_lm_head=True, initializer_range=0.02,
                 use_normal_initialization=False, pre_layernorm=False, post_layernorm=True,
                 attention_in_fp32=False, query_key_layer_scaling=False,
                 fp32_residual_addition=False, fused_softmax=True, fused_bias_gelu=False,
                 distribute_embedding=False, _scale_qkv_fan_out=False, *, rotary_dim=None,
                 use_alibi=False, alibi_bias_max=8, seed=None, dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        _check_v1_options(type(self).__name__, rotary_dim, use_alibi, add_cross_attention)
        if distribute_embedding:
            raise _C.NotSupportedError(
                "smp.nn.DistributedTransformerLMHead: distribute_embedding=True is not supported; "
                "the embeddings and the LM head stay replicated (distribute_embedding=False)")
        if causal_mask_size is not None and int(num_positions) > int(causal_mask_size):
            raise _C.ConfigError(
                f"smp.nn.DistributedTransformerLMHead: causal_mask_size ({causal_mask_size}) must "
                f"be at least num_positions ({num_positions})")
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_positions = int(num_positions)
        self.num_token_types = int(num_token_types)
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.add_lm_head = bool(add_lm_head)
        values = dict(locals())
        config = {k: values[k] for k in _LAYER_KEYS}
        seed = _seed(seed)
        g = torch.Generator().manual_seed(seed)

        def embedding(n):
            e = torch.nn.Embedding(n, self.hidden_size, device=device, dtype=dtype)
            with torch.no_grad():
                e.weight.copy_(torch.empty(n, self.hidden_size).normal_(
                    0.0, float(initializer_range), generator=g))
            return e

        self.word_embedding = embedding(self.vocab_size)
        self.position_embedding = embedding(self.num_positions)
        if self.num_token_types > 0:
            self.token_type_embedding = embedding(self.num_token_types)
        self.transformer = DistributedTransformer(num_layers=num_layers, **config,
                                                  seed=seed + 1)
        if self.add_lm_head:
            self.lm_head = torch.nn.Linear(self.hidden_size, self.vocab_size, bias=False,
                                           device=device, dtype=dtype)
            self.lm_head.weight = self.word_embedding.weight
        self.ce_loss = torch.nn.CrossEntropyLoss()

    def forward(self, inputs):
        input_ids, attention_mask, token_type_ids, position_ids, labels = inputs
        if input_ids.dim() != 2:
            raise _C.ConfigError(
                f"smp.nn.DistributedTransformerLMHead: input_ids must be [batch, seq], got shape "
                f"{tuple(input_ids.shape)}")
        s = input_ids.shape[1]
        if s > self.num_positions:
            raise _C.ConfigError(
                f"smp.nn.DistributedTransformerLMHead: sequence length {s} exceeds num_positions "
                f"{self.num_positions}")
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)
        h = self.word_embedding(input_ids) + self.position_embedding(position_ids)
        if token_type_ids is not None:
            h = h + (self.token_type_embedding(token_type_ids) if self.num_token_types > 0
                     else self.word_embedding(token_type_ids))
        h = _F.replicated_dropout(h, self.hidden_dropout_prob, self.training,
                                  self._smp_prescaled_batch)
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask.reshape(input_ids.shape[0], -1)[:, None, None, :]
                    .to(h.dtype)) * -10000.0
        h, _ = self.transformer((h, mask))
        if not self.add_lm_head:
            return h
        logits = self.lm_head(h)
        if labels is None:
            return logits
        loss = self.ce_loss(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                            labels[..., 1:].reshape(-1))
        return loss, logits

    @property
    def _smp_prescaled_batch(self):
        return bool(_C.config()["prescaled_batch"])
