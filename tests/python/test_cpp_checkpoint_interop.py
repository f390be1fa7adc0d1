"""Checkpoints move between the C++ and the Python front ends (issue 10): the
C++ smp::DistributedOptimizer writes and reads the files and the state-dict
structure of the Python smp.DistributedOptimizer, and smp::DistributedModel
those of smp.DistributedModel.

Both halves train the same model on the same data (examples/cpp/checkpoint_tp.cc
and tests/python/mp/checkpoint_interop.py), save the seed's Option 1 (partial)
and Option 2 (full, with the full optimizer state), and the other language
loads both into a differently initialised model and continues training: its
losses and parameters must match the saving run's uninterrupted continuation.
The executable is looked up in $SMP_BUILD_DIR/examples/cpp (default
<repo>/build)."""

import os
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, _env, _run, mpirun_prefix, ok_ranks, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

BUILD_DIR = Path(os.environ.get("SMP_BUILD_DIR", REPO_ROOT / "build"))
EXE = BUILD_DIR / "examples" / "cpp" / "checkpoint_tp"
# libtorch's C++ Adam and torch.optim.Adam round differently in the last bits.
ATOL = "1e-5"

needs_exe = pytest.mark.skipif(
    not EXE.exists(),
    reason=f"{EXE} is not built (cmake --build <build> --target checkpoint_tp; set SMP_BUILD_DIR)")


def run_cpp(np_, *args):
    cmd = mpirun_prefix(np_) + ["-x", "SMP_COMM_TIMEOUT", str(EXE), *map(str, args)]
    return _run(cmd, _env(None), 300).stdout


def cpp_args(tp, shard):
    return ["--tp", tp] + (["--shard"] if shard else [])


@needs_exe
@pytest.mark.parametrize("shard", [0, 1])
def test_python_saves_cpp_resumes(tmp_path, shard):
    run_mpi(4, "checkpoint_interop.py", tmp_path, 2, shard, "save")
    out = run_cpp(4, *cpp_args(2, shard), "--dir", tmp_path, "--phase", "resume", "--atol", ATOL)
    assert "checkpoint_tp: OK" in out, out


@needs_exe
@pytest.mark.parametrize("shard", [0, 1])
def test_cpp_saves_python_resumes(tmp_path, shard):
    run_cpp(4, *cpp_args(2, shard), "--dir", tmp_path, "--phase", "save")
    out = run_mpi(4, "checkpoint_interop.py", tmp_path, 2, shard, "resume", ATOL).stdout
    assert ok_ranks(out, "checkpoint_interop") == [0, 1, 2, 3], out


@needs_exe
@pytest.mark.parametrize("shard", [0, 1])
def test_cpp_saves_tp2_python_reshards_tp4(tmp_path, shard):
    """Resharding across languages: C++ saves Option 1 at tp2 (with
    smp::record_shards), Python's smp.load(partial=True) reshards it at tp4."""
    run_cpp(4, *cpp_args(2, shard), "--dir", tmp_path, "--phase", "save")
    out = run_mpi(4, "checkpoint_interop.py", tmp_path, 4, shard, "resume", ATOL).stdout
    assert ok_ranks(out, "checkpoint_interop") == [0, 1, 2, 3], out


@needs_exe
@pytest.mark.parametrize("shard", [0, 1])
def test_python_saves_tp2_cpp_reshards_tp1(tmp_path, shard):
    """The reverse: Python saves at tp2, C++ smp::load_resharded reads it at tp1."""
    run_mpi(4, "checkpoint_interop.py", tmp_path, 2, shard, "save")
    out = run_cpp(4, *cpp_args(1, shard), "--dir", tmp_path, "--phase", "resume", "--atol", ATOL)
    assert "Option 1 (partial): resharded" in out and "checkpoint_tp: OK" in out, out


def structure(obj, where="", out=None):
    """{path: description} of a checkpoint object: types, keys, tensor dtypes and
    shapes, and the values of everything but tensors."""
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[where] = ("tensor", obj.dtype, tuple(obj.shape))
    elif isinstance(obj, dict):
        out[where] = ("dict", list(obj.keys()))
        for k, v in obj.items():
            structure(v, f"{where}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        out[where] = (type(obj).__name__, len(obj))
        for i, v in enumerate(obj):
            structure(v, f"{where}[{i}]", out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        # Python's defaults are ints where C++ options are doubles (weight_decay=0).
        out[where] = ("number", float(obj))
    else:
        out[where] = (type(obj).__name__, obj)
    return out


@needs_exe
@pytest.mark.parametrize("shard", [0, 1])
def test_same_files_and_structure(tmp_path, shard):
    """Both languages write the same files, every one loadable with stock
    torch.load(weights_only=True), holding the same structure: same keys in
    the same order, same types, same hyperparameters, same tensor shapes."""
    py, cpp = tmp_path / "py", tmp_path / "cpp"
    py.mkdir()
    cpp.mkdir()
    run_mpi(4, "checkpoint_interop.py", py, 2, shard, "save")
    run_cpp(4, *cpp_args(2, shard), "--dir", cpp, "--phase", "save")
    names = sorted(p.name for p in py.iterdir() if not p.name.endswith(".json"))
    assert names == sorted(p.name for p in cpp.iterdir() if not p.name.endswith(".json"))
    want = ["checkpoint.pt_0_0", "checkpoint.pt_0_1"] if not shard else [
        f"checkpoint.pt_0_{t}_{r}" for t in range(2) for r in range(2)]
    assert set(want + ["full.pt", "reference.pt"]) <= set(names), names
    for name in names:
        if name == "reference.pt":
            continue
        a = torch.load(py / name, weights_only=True)
        b = torch.load(cpp / name, weights_only=True)
        sa, sb = structure(a), structure(b)
        assert list(sa) == list(sb), name
        for k in sa:
            assert sa[k] == sb[k], f"{name}: {k}: Python {sa[k]} != C++ {sb[k]}"
