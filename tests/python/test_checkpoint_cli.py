"""smp-checkpoint (python -m smp.checkpoint) on checkpoints written by real mpirun
jobs (issue 16): inspect, verify (a flipped byte, a missing part), consolidate
(stock torch.load(weights_only=True), strict load into the plain model, equal to
the gathered state), reshard (the output resumes on the new layout), export
(safetensors) and diff.

The checkpoints come from tests/python/mp/reshard.py save: pp2 x tp2 with Adam
(optimizer state not sharded) and pp2 x tp2 with SGD momentum and
shard_optimizer_state (v3 parts); its ref_<opt>.pt holds the gathered model
state and the optimizer state by parameter name.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON_DIR, REPO_ROOT, run_mpi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp"))
from transformer_block import Block  # noqa: E402

pytestmark = pytest.mark.mpi
TIMEOUT = 240
VOCAB, CLASSES = 11, 3


def cli(*args, expect_rc=0, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    r = subprocess.run([sys.executable, "-m", "smp.checkpoint", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    out = r.stdout + r.stderr
    if expect_rc is not None:
        ok = r.returncode != 0 if expect_rc == "nonzero" else r.returncode == expect_rc
        assert ok, (f"exit {r.returncode}, expected {expect_rc}: smp-checkpoint "
                    f"{' '.join(map(str, args))}\n{out}")
    return r.returncode, out


class PlainNet(torch.nn.Module):
    """tests/python/mp/reshard.py's Net without smp: the unwrapped model."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Module()
        self.embed.vocab = torch.nn.Embedding(VOCAB, 3)
        self.embed.dim = torch.nn.Embedding(VOCAB, 5)
        self.block = Block()
        self.mid1 = torch.nn.Module()
        self.mid1.fc = torch.nn.Linear(8, 10)
        self.mid2 = torch.nn.Module()
        self.mid2.fc = torch.nn.Linear(10, 6)
        self.head = torch.nn.Module()
        self.head.out = torch.nn.Linear(6, CLASSES)

    def forward(self, ids):
        x = torch.cat([self.embed.vocab(ids), self.embed.dim(ids)], dim=-1)
        x = self.block(x)
        x = torch.relu(self.mid2.fc(torch.relu(self.mid1.fc(x))))
        return self.head.out(x).mean(dim=1)


def _save(tmp_path_factory, name, shard, opt):
    d = tmp_path_factory.mktemp(name)
    run_mpi(4, "reshard.py", "save", d, 2, 2, int(shard), opt, timeout=TIMEOUT)
    return d


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    return _save(tmp_path_factory, "cli_adam", False, "adam")


@pytest.fixture(scope="module")
def sgd_sharded(tmp_path_factory):
    return _save(tmp_path_factory, "cli_sgd_v3", True, "sgd")


def _ref(d, opt):
    return torch.load(d / f"ref_{opt}.pt", weights_only=True)


# ---- inspect ---------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_inspect(adam, sgd_sharded):
    _, out = cli("inspect", adam / "ckpt.pt")
    assert "pp 2 x tp 2 x rdp 1" in out and "not sharded" in out and "complete     yes" in out
    assert "model/embed.vocab.weight" in out and "split dim 0 into 2" in out
    assert "KiB" in out or " B" in out
    _, out = cli("inspect", sgd_sharded / "ckpt.pt", "--json")
    d = json.loads(out)
    assert d["pp_size"] == 2 and d["tp_size"] == 2 and d["sharded_optimizer_state"] is True
    assert d["complete"] and d["save_id"] and d["smp_version"]
    by = {t["name"]: t for t in d["tensors"]}
    assert by["model/embed.dim.weight"]["global_shape"] == [VOCAB, 5]
    assert by["model/embed.dim.weight"]["layout"] == "split dim 1 into 2"
    assert by["model/head.out.weight"]["layout"] == "replicated"
    assert any(n.startswith("optimizer/") and n.endswith("/momentum_buffer") for n in by)
    assert all(p["rdp_rank"] is not None for p in d["parts"])  # v3 parts


# ---- verify ----------------------------------------------------------------------------

def _copy_ckpt(src_dir, dst_dir):
    dst_dir.mkdir()
    for n in os.listdir(src_dir):
        if n.startswith("ckpt.pt"):
            shutil.copy2(src_dir / n, dst_dir / n)
    return dst_dir / "ckpt.pt"


@pytest.mark.timeout(300)
def test_verify_ok_flipped_byte_and_missing_part(adam, tmp_path):
    cli("verify", adam / "ckpt.pt")
    f = _copy_ckpt(adam, tmp_path / "flip")
    part = f.parent / "ckpt.pt_1_0"
    index = json.loads(subprocess.run(
        [sys.executable, "-c", f"import smp; print(smp._C.CheckpointFile('{part}').index_json())"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(PYTHON_DIR)),
        timeout=60).stdout)
    t = max(index["tensors"], key=lambda t: t["nbytes"])
    with open(part, "r+b") as fd:
        fd.seek(t["offset"] + 1)
        b = fd.read(1)
        fd.seek(t["offset"] + 1)
        fd.write(bytes([b[0] ^ 0x40]))
    rc, out = cli("verify", f, expect_rc=1)
    assert "ckpt.pt_1_0" in out and "CRC" in out and "/".join(t["path"]) in out, out

    f = _copy_ckpt(adam, tmp_path / "missing")
    os.remove(f.parent / "ckpt.pt_0_1")
    rc, out = cli("verify", f, expect_rc=1)
    assert "ckpt.pt_0_1" in out and "missing" in out, out


# ---- consolidate -----------------------------------------------------------------------

def _by_name(osd):
    out = {}
    for group, names in zip(osd["param_groups"], osd["_smp_param_names"]):
        for i, n in zip(group["params"], names):
            if i in osd["state"]:
                out[n] = osd["state"][i]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["adam", "sgd_sharded"])
def test_consolidate(which, request, tmp_path):
    d = request.getfixturevalue(which)
    opt = "adam" if which == "adam" else "sgd"
    ref = _ref(d, opt)
    out = tmp_path / "full.pt"
    _, text = cli("consolidate", d / "ckpt.pt", out)
    assert "peak memory growth" in text and "largest tensor" in text, text
    full = torch.load(out, weights_only=True)  # stock torch reads it
    assert full["epoch"] == 7
    sd = full["model_state_dict"]
    assert set(sd) == set(ref["before"]), (sorted(sd), sorted(ref["before"]))
    for k, v in ref["before"].items():
        assert torch.equal(sd[k], v), k
    plain = PlainNet()
    plain.load_state_dict(sd, strict=True)
    ids = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(3))
    ref_net = PlainNet()
    ref_net.load_state_dict(ref["before"], strict=True)
    assert torch.equal(plain(ids), ref_net(ids))
    by_name = _by_name(full["optimizer_state_dict"])
    assert set(by_name) == set(ref["opt_before"])
    for n, st in ref["opt_before"].items():
        assert st.keys() == by_name[n].keys(), n
        for k, v in st.items():
            w = by_name[n][k]
            assert (torch.equal(w, v) if torch.is_tensor(v) else w == v), (n, k)
    # A plain torch optimizer on the plain model takes the full optimizer state.
    names = [n for n, _ in plain.named_parameters()]
    osd = full["optimizer_state_dict"]
    order = [n for g in osd["_smp_param_names"] for n in g]
    # The order is the smp model's (its transformer layer registers parameters in
    # its own order); a plain optimizer built over the parameters in that order loads it.
    assert sorted(order) == sorted(names)
    by_param = dict(plain.named_parameters())
    params = [by_param[n] for n in order]
    popt = (torch.optim.Adam(params, lr=1e-2) if opt == "adam"
            else torch.optim.SGD(params, lr=5e-2, momentum=0.9))
    popt.load_state_dict({"state": osd["state"], "param_groups": osd["param_groups"]})


@pytest.mark.timeout(120)
def test_consolidate_refuses_a_single_file(adam, tmp_path):
    rc, out = cli("consolidate", adam / "ref_adam.pt", tmp_path / "x.pt", expect_rc=2)
    assert "ref_adam.pt" in out and "partial checkpoint" in out


# ---- export ----------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_export_safetensors(adam, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    out = tmp_path / "hf"
    _, text = cli("export", adam / "ckpt.pt", out, "--format", "safetensors",
                  "--max-shard-size", "300B")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1, files  # the small limit forces several shards
    sd = {}
    for f in files:
        sd.update(st.load_file(str(out / f)))
    ref = _ref(adam, "adam")
    assert set(sd) == set(ref["before"])
    for k, v in ref["before"].items():
        assert torch.equal(sd[k], v), k
    PlainNet().load_state_dict(sd, strict=True)


# ---- reshard ---------------------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", [(1, 4, 1), (1, 1, 2)])
def test_reshard_offline_resumes(adam, tmp_path, layout):
    """smp-checkpoint reshard pp2xtp2 -> the layout; reshard.py load then loads it
    with smp.load(partial=True) and the unchanged load_state_dict calls on that
    layout, checks the state bit for bit and one more step against the
    uninterrupted run."""
    pp, tp, rdp = layout
    new = tmp_path / "new"
    new.mkdir()
    _, text = cli("reshard", adam / "ckpt.pt", new / "ckpt.pt", "--pp", pp, "--tp", tp,
                  "--rdp", rdp)
    assert "peak memory growth" in text, text
    shutil.copy2(adam / "ref_adam.pt", new / "ref_adam.pt")
    m = json.loads((new / "ckpt.pt.smp_manifest.json").read_text())
    assert (m["pp_size"], m["tp_size"], m["rdp_size"]) == layout and m["by_name"] is True
    assert len(m["files"]) == pp * tp
    cli("verify", new / "ckpt.pt")
    _, text = cli("diff", adam / "ckpt.pt", new / "ckpt.pt")  # same tensors, other layout
    assert "0 different" in text, text
    out = run_mpi(pp * tp * rdp, "reshard.py", "load", new, pp, tp, 0, "adam", timeout=TIMEOUT)
    assert out.stdout.count("reshard OK") == pp * tp * rdp


@pytest.mark.timeout(600)
def test_reshard_offline_save_checkpoint_folder(sgd_sharded, tmp_path):
    """A save_checkpoint folder (model + v3 optimizer parts + user content) rewritten
    for pp1 x tp2 x rdp2 resumes there with smp.resume_from_checkpoint."""
    src = sgd_sharded / "sc" / "t_partial"
    _, out = cli("verify", src)  # a folder: each checkpoint in it
    assert out.count("OK:") >= 3 and "optimizer_states" in out, out
    _, out = cli("inspect", src)
    assert "sharded (v3 parts)" in out and "user_content.pt" in out, out
    new = tmp_path / "new"
    (new / "sc").mkdir(parents=True)
    cli("reshard", src, new / "sc" / "t_partial", "--pp", 1, "--tp", 2, "--rdp", 2)
    assert (new / "sc" / "t_partial" / "user_content.pt").is_file()
    shutil.copy2(sgd_sharded / "ref_sgd.pt", new / "ref_sgd.pt")
    out = run_mpi(4, "reshard.py", "load", new, 1, 2, 1, "sgd", "resume", timeout=TIMEOUT)
    assert out.stdout.count("reshard OK") == 4


# ---- diff ------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_diff(adam, tmp_path):
    a = tmp_path / "a.pt"
    cli("consolidate", adam / "ckpt.pt", a)
    full = torch.load(a, weights_only=True)
    full["model_state_dict"]["mid1.fc.weight"][0, 0] += 0.5
    b = tmp_path / "b.pt"
    torch.save(full, b)
    cli("diff", a, a)
    rc, out = cli("diff", a, b, expect_rc=1)
    assert "mid1.fc.weight" in out and "max |a-b| 0.5" in out and "1 of 80 elements" in out, out


# ---- packaging -------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_console_script_declared():
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'smp-checkpoint = "smp.checkpoint.cli:main"' in text
    rc, out = cli("--help")
    assert "inspect" in out and "consolidate" in out and "reshard" in out and "export" in out


@pytest.mark.timeout(60)
def test_errors_name_the_path(tmp_path):
    rc, out = cli("inspect", tmp_path / "nothing.pt", expect_rc=2)
    assert "nothing.pt" in out and "smp.save" in out


# ---- streaming full save inside a job ----------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [(2, 2), (1, 2)])
def test_streaming_full_save_is_identical(tmp_path, layout):
    """smp.checkpoint.save_full_streaming writes the same records as smp.save of
    model.state_dict(gather_to_rank0=True); save_checkpoint(partial=False) uses it."""
    pp, tp = layout
    out = run_mpi(pp * tp, "ckpt_stream.py", tmp_path, pp, tp, timeout=TIMEOUT)
    assert out.stdout.count("stream OK") == pp * tp
