"""smp.nn.DistributedEmbedding: torch.nn.Embedding split across TP_GROUP."""

import torch

from smp import _C
from smp._runtime import tp_rank, tp_size
from smp.nn.base import DistributedModule, _require_init


class DistributedEmbedding(DistributedModule):
    """torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx) across TP_GROUP.

    The weight is split along the embedding dimension, or with
    ``vocab_parallel=True`` along the vocabulary (rows); uneven splits give the
    remainder to the lowest tp ranks. Indices ``[b, ...]`` are this rank's batch
    (prescaled_batch off) or the group's shared batch (on); the output is
    ``[b, ..., embedding_dim]``. Initialized as torch.nn.Embedding (N(0, 1),
    padding row zero) from ``seed``.

        emb = smp.nn.DistributedEmbedding(50000, 1024, vocab_parallel=True)
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, vocab_parallel=False,
                 seed=None, dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.vocab_parallel = bool(vocab_parallel)
        if padding_idx is not None:
            padding_idx = int(padding_idx)
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise _C.ConfigError(
                    f"DistributedEmbedding: padding_idx {padding_idx} is outside the vocabulary "
                    f"of {self.num_embeddings} embeddings; pass an index in "
                    f"[{-self.num_embeddings}, {self.num_embeddings}) or None"
                )
            if padding_idx < 0:
                padding_idx += self.num_embeddings
        self.padding_idx = padding_idx
        self._smp_build(
            _C.nn.embedding_layout(self.num_embeddings, self.embedding_dim, self.vocab_parallel,
                                   -1 if padding_idx is None else padding_idx),
            seed, dtype, device,
        )
        self._offset = self._smp_layout("weight").offset(tp_size(), tp_rank())

    def forward(self, ids):
        return _C.nn.embedding_forward(
            ids, self.weight, self.embedding_dim, self._offset, self.vocab_parallel,
            self.padding_idx, self._smp_prescaled_batch, self.num_embeddings,
        )

    @classmethod
    def from_module(cls, module, vocab_parallel=False):
        """A DistributedEmbedding holding this rank's slice of ``module``'s (a
        torch.nn.Embedding) weight, same padding_idx, dtype and device."""
        if not isinstance(module, torch.nn.Embedding):
            raise _C.ConfigError(
                "DistributedEmbedding.from_module expects a torch.nn.Embedding, got "
                f"{type(module).__name__}"
            )
        if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
            raise _C.NotSupportedError(
                "DistributedEmbedding.from_module: max_norm, sparse and scale_grad_by_freq "
                "are not supported; build the torch.nn.Embedding without them"
            )
        out = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                  vocab_parallel=vocab_parallel, seed=0, dtype=module.weight.dtype,
                  device=module.weight.device)
        out._smp_load_full("weight", module.weight)
        return out

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", vocab_parallel={self.vocab_parallel}, tp_rank={tp_rank()}/{tp_size()}"
