"""``smdistributed.modelparallel.torch`` is the ``smp`` package: this module
replaces itself in sys.modules, so ``import smdistributed.modelparallel.torch
as smp`` yields the very same module object as ``import smp``. Submodules
resolve too (``smdistributed.modelparallel.torch.comm`` is ``smp.comm``)."""

import importlib
import importlib.abc
import importlib.util
import sys

import smp as _smp

_PREFIX = __name__ + "."


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Maps smdistributed.modelparallel.torch.X to smp.X."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_PREFIX):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a placeholder; exec_module swaps in the real module

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds under the name
        # after exec_module, so the alias and smp.X are one module object.
        real = importlib.import_module("smp." + module.__name__[len(_PREFIX):])
        sys.modules[module.__name__] = real


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())

sys.modules[__name__] = _smp
