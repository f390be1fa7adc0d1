"""smp.patches: smp v1's module path of its activation checkpointing functions
(``smdistributed.modelparallel.torch.patches.checkpoint``)."""
