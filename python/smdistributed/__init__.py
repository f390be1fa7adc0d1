"""Compatibility namespace: ``import smdistributed.modelparallel.torch as smp``
gives the ``smp`` package itself, so scripts written for the SageMaker model
parallel library v1 run unchanged."""
