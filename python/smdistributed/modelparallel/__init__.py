"""See smdistributed.modelparallel.torch: an alias of the ``smp`` package."""
