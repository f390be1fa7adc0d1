"""import smdistributed.modelparallel.torch as smp gives the smp package itself."""

import subprocess
import sys

import pytest

from conftest import PYTHON_DIR, _env

pytestmark = pytest.mark.timeout(120)


def test_alias_is_same_module():
    import smp
    import smdistributed.modelparallel.torch as smp2

    assert smp2 is smp
    import smdistributed.modelparallel.torch.comm as comm2

    assert comm2 is smp.comm
    from smdistributed.modelparallel.torch import ReduceOp, get_tp_group

    assert ReduceOp is smp.ReduceOp and get_tp_group is smp.get_tp_group
    assert smp.comm.__name__ == "smp.comm"


def test_alias_first_import_in_fresh_process():
    code = ("import smdistributed.modelparallel.torch as smp, sys; import smp as s; "
            "assert smp is s and sys.modules['smdistributed.modelparallel.torch'] is s; "
            "smp.init(); assert smp.size() == 1; smp.shutdown(); print('alias OK')")
    out = subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "alias OK" in out.stdout, out.stdout + out.stderr
    assert PYTHON_DIR.is_dir()


def test_missing_submodule_names_smp():
    with pytest.raises(ModuleNotFoundError, match="smp.no_such_module"):
        import smdistributed.modelparallel.torch.no_such_module  # noqa: F401
