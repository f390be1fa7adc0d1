"""The protocol of smp's tensor-parallel modules, which smp.DistributedModel
relies on to average gradients, save and load checkpoints and gather the full
model.

Each module describes its full (non-distributed) parameters with layouts from
the engine (smp._C.nn.ParamLayout): name, global shape, split dimension across
TP_GROUP, or the one tp rank that holds it. Parameters a rank does not hold
(a row-parallel bias off tp rank 0) are not registered on that rank.
"""

import torch

from smp import _C
from smp._runtime import config, tp_rank, tp_size
from smp.utils import mark_distribution_axis


def _require_init(cls_name):
    if not _C.is_initialized():
        raise _C.StateError(
            f"smp.nn.{cls_name} needs smp.init() first: the module reads tp_size, tp_rank "
            "and prescaled_batch at construction"
        )


def _seed(seed):
    """The seed of a module's full initialization: the given one, or one drawn
    from torch's default generator (ranks seeded alike with torch.manual_seed
    then draw the same full parameters)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (1,)).item())


class DistributedModule(torch.nn.Module):
    """Base class of the tensor-parallel modules (smp.nn.DistributedLinear, ...).

    Subclasses call ``_smp_build(layouts, seed)`` in their constructor. The
    methods below are the protocol:

    - ``_smp_shard_specs()``: ``{name: {"split_dim": int or None,
      "global_shape": tuple, "distributed": bool}}`` for the parameters
      registered on this rank. ``distributed`` is True when the gradient already
      holds the whole TP group's batches (split parameters and those held by one
      tp rank): sum those over RDP_GROUP, average the others over DP_GROUP.
    - ``_smp_full_param_names()``: every full parameter across tp ranks,
      ``{name: {"global_shape", "split_dim", "holder"}}`` (holder: the tp rank
      that alone holds an unsplit parameter, None for replicas and split ones).
    - ``_smp_load_full(name, full)``: copies this rank's slice of a full parameter in.
    - ``_smp_gather_full(name)``: collective over TP_GROUP, the full parameter.
    """

    def _smp_build(self, layouts, seed, dtype=None, device=None):
        self._smp_layouts = {p.name: p for p in layouts}
        self._smp_prescaled_batch = bool(config()["prescaled_batch"])
        values = _C.nn.init_local(layouts, _seed(seed), tp_size(), tp_rank())
        held = [p for p in layouts if p.held_by(tp_rank())]
        for layout, value in zip(held, values):
            if dtype is not None or device is not None:
                value = value.to(dtype=dtype, device=device)
            param = torch.nn.Parameter(value)
            mark_distribution_axis(param, layout.split_dim)
            self._smp_register(layout.name, param)

    def _smp_register(self, name, param):
        owner = self
        *path, leaf = name.split(".")
        for part in path:
            child = getattr(owner, part, None)
            if child is None:
                child = torch.nn.Module()
                owner.add_module(part, child)
            owner = child
        owner.register_parameter(leaf, param)

    def _smp_local(self, name):
        """This rank's tensor of parameter ``name``, or None where not held."""
        return dict(self.named_parameters()).get(name)

    def _smp_layout(self, name):
        try:
            return self._smp_layouts[name]
        except KeyError:
            raise _C.ConfigError(
                f"{type(self).__name__} has no parameter '{name}'; its parameters are: "
                + ", ".join(self._smp_layouts)
            ) from None

    def _smp_shard_specs(self):
        out = {}
        for name, layout in self._smp_layouts.items():
            if layout.held_by(tp_rank()):
                out[name] = {
                    "split_dim": layout.split_dim if tp_size() > 1 else None,
                    "global_shape": layout.global_shape,
                    "distributed": layout.distributed(),
                }
        return out

    def _smp_full_param_names(self):
        return {
            name: {
                "global_shape": layout.global_shape,
                "split_dim": layout.split_dim,
                "holder": layout.holder,
            }
            for name, layout in self._smp_layouts.items()
        }

    def _smp_load_full(self, name, full):
        layout = self._smp_layout(name)
        if tuple(full.shape) != layout.global_shape:
            raise _C.ConfigError(
                f"{type(self).__name__}._smp_load_full('{name}') on tp rank {tp_rank()}: "
                f"expected the full parameter of shape {layout.global_shape}, got "
                f"{tuple(full.shape)}"
            )
        local = self._smp_local(name)
        if local is None:
            return
        with torch.no_grad():
            piece = _C.nn.local_slice(layout, full.detach(), tp_size(), tp_rank())
            local.copy_(piece)

    def _smp_gather_full(self, name):
        layout = self._smp_layout(name)
        local = self._smp_local(name)
        like = local if local is not None else next(self.parameters())
        with torch.no_grad():
            return _C.nn.gather_full(layout, None if local is None else local.detach(), like)


class DistributedContainer(DistributedModule):
    """A tensor-parallel module built from other modules (smp.nn.DistributedTransformer,
    DistributedTransformerLMHead): its tensor-parallel submodules (the outermost
    ones) answer for their parameters, every other parameter is a replica on
    each tp rank. Parameters shared between submodules (a tied LM head) appear
    under each of their names in the full parameter names, as in a state dict."""

    def _smp_parts(self):
        """{prefix: outermost tensor-parallel submodule} (prefix ends with '.')."""
        parts = {}
        for name, m in self.named_modules():
            if m is self or not callable(getattr(m, "_smp_shard_specs", None)):
                continue
            if any(name.startswith(p) for p in parts):
                continue
            parts[name + "."] = m
        return parts

    def _smp_route(self, name):
        for prefix, part in self._smp_parts().items():
            if name.startswith(prefix):
                return part, name[len(prefix):]
        return None, name

    def _smp_plain(self, remove_duplicate=True):
        parts = tuple(self._smp_parts())
        return [(n, p) for n, p in self.named_parameters(remove_duplicate=remove_duplicate)
                if not n.startswith(parts)]

    def _smp_shard_specs(self):
        out = {}
        for prefix, part in self._smp_parts().items():
            out.update({prefix + n: s for n, s in part._smp_shard_specs().items()})
        for n, p in self._smp_plain():
            out[n] = {"split_dim": None, "global_shape": tuple(p.shape), "distributed": False}
        return out

    def _smp_full_param_names(self):
        out = {}
        for prefix, part in self._smp_parts().items():
            out.update({prefix + n: s for n, s in part._smp_full_param_names().items()})
        for n, p in self._smp_plain(remove_duplicate=False):
            out[n] = {"global_shape": tuple(p.shape), "split_dim": None, "holder": None}
        return out

    def _smp_plain_param(self, name):
        for n, p in self._smp_plain(remove_duplicate=False):
            if n == name:
                return p
        raise _C.ConfigError(
            f"{type(self).__name__} has no parameter '{name}'; its parameters are: "
            + ", ".join(self._smp_full_param_names()))

    def _smp_load_full(self, name, full):
        part, local = self._smp_route(name)
        if part is not None:
            return part._smp_load_full(local, full)
        p = self._smp_plain_param(name)
        if tuple(full.shape) != tuple(p.shape):
            raise _C.ConfigError(
                f"{type(self).__name__}._smp_load_full('{name}') on tp rank {tp_rank()}: "
                f"expected the full parameter of shape {tuple(p.shape)}, got {tuple(full.shape)}")
        with torch.no_grad():
            p.copy_(full.detach())

    def _smp_gather_full(self, name):
        part, local = self._smp_route(name)
        if part is not None:
            return part._smp_gather_full(local)
        return self._smp_plain_param(name).detach().clone()
