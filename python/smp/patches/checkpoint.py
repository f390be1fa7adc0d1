"""smp v1's ``smdistributed.modelparallel.torch.patches.checkpoint``:
checkpoint(module, *args, preserve_rng_state=True) and
checkpoint_sequential(sequential_module, input, strategy="each",
preserve_rng_state=True, pack_args_as_tuple=False). ``smp.checkpoint`` itself is
smp's checkpoint (save/load) module, so import these from here (or use
smp.checkpoint_sequential)."""

from smp._compat import checkpoint, checkpoint_sequential

__all__ = ["checkpoint", "checkpoint_sequential"]
