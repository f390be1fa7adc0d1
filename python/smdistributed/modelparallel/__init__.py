"""See smdistributed.modelparallel.torch: an alias of the ``smp`` package.

``from smdistributed.modelparallel import __version__`` gives smp's version (it
imports smp on first use)."""


def __getattr__(name):
    if name == "__version__":
        import smp

        return smp.__version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
