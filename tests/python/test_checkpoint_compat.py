"""Checkpoints written by smp before issue 11 (tests/data/compat_v1, made by
tests/data/make_compat.py) still load: with smp.load and with stock
torch.load(weights_only=True), giving back exactly what was saved."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_mpi_code

DATA = Path(__file__).resolve().parents[1] / "data" / "compat_v1"
_spec = importlib.util.spec_from_file_location("make_compat", DATA.parent / "make_compat.py")
make_compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_compat)
EXPECTED = json.loads((DATA / "expected.json").read_text())

# (file, key in expected.json)
FILES = [
    ("partial/ckpt.pt_0_0", "partial/tp0"),
    ("partial/ckpt.pt_0_1", "partial/tp1"),
    ("train/step1_partial/model_0_0.pt", "train/model/tp0"),
    ("train/step1_partial/model_0_1.pt", "train/model/tp1"),
    ("full/model.pt", "full"),
]


@pytest.mark.parametrize("name,key", FILES)
def test_old_file_loads_with_smp_and_torch(smp_single, name, key):
    smp = smp_single
    path = str(DATA / name)
    assert make_compat.canonical(smp.load(path, partial=False)) == EXPECTED[key]
    assert make_compat.canonical(torch.load(path, weights_only=True)) == EXPECTED[key]


def test_old_train_files_load(smp_single):
    smp = smp_single
    folder = DATA / "train" / "step1_partial"
    assert smp.load(str(folder / "user_content.pt"), partial=False) == {"step": 1, "note": "compat"}
    cfg = smp.load(str(folder / "smp_config.pt"), partial=False)
    assert (cfg["pp_size"], cfg["tp_size"], cfg["world_size"]) == (1, 2, 2)
    for tp in (0, 1):
        osd = smp.load(str(folder / f"optimizer_states_0_{tp}.pt"), partial=False)
        assert set(osd) >= {"state", "param_groups"}
        assert torch.load(str(folder / f"optimizer_states_0_{tp}.pt"), weights_only=True).keys() \
            == osd.keys()


@pytest.mark.mpi
def test_old_partial_checkpoint_loads_on_its_layout(tmp_path):
    # A copy: loading must not need to write, but a failed run must not touch the data.
    copy = tmp_path / "compat_v1"
    shutil.copytree(DATA, copy)
    code = f"""
import importlib.util, json, torch, smp
spec = importlib.util.spec_from_file_location("mc", {str(DATA.parent / "make_compat.py")!r})
mc = importlib.util.module_from_spec(spec); spec.loader.exec_module(mc)
expected = json.load(open({str(DATA / "expected.json")!r}))
smp.init({{"pipeline_parallel_degree": 1, "tensor_parallel_degree": 2, "ddp": True}})
tp = smp.tp_rank()
got = smp.load({str(copy / "partial" / "ckpt.pt")!r}, partial=True)
assert mc.canonical(got) == expected[f"partial/tp{{tp}}"], "partial/ckpt.pt"
torch.manual_seed(5)
with smp.tensor_parallelism():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
model = smp.DistributedModel(net)
opt = smp.DistributedOptimizer(torch.optim.Adam(list(dict.fromkeys(model.parameters())), lr=1e-2))
uc = smp.resume_from_checkpoint({str(copy / "train")!r}, model=model, optimizer=opt)
assert uc == {{"step": 1, "note": "compat"}}, uc
assert mc.canonical(model.local_state_dict()) == expected[f"train/model/tp{{tp}}"]
print("compat OK " + str(smp.rank()), flush=True)
"""
    res = run_mpi_code(2, code)
    assert res.stdout.count("compat OK") == 2, res.stdout


def test_refusal_is_unsafe_load_error(smp_single, tmp_path):
    """A pickle that needs code is refused with smp.UnsafeLoadError (a
    CheckpointError), raised by the engine and caught by type in smp.load."""
    smp = smp_single
    import collections

    f = tmp_path / "counter.pt"
    torch.save({"c": collections.Counter(a=1)}, f)
    with pytest.raises(smp.UnsafeLoadError, match="collections Counter"):
        smp._C.ckpt_load(str(f), partial=False)
    assert issubclass(smp.UnsafeLoadError, smp.CheckpointError)
    # smp.load catches it and falls back to torch.load(weights_only=True),
    # whose allowlist holds Counter.
    assert smp.load(str(f), partial=False) == {"c": collections.Counter(a=1)}
