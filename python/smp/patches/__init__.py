"""smp v1's ``smdistributed.modelparallel.torch.patches``: activation
checkpointing (``patches.checkpoint``)."""
