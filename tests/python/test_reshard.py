"""Resharding partial checkpoints (issue 12): save on one layout, smp.load(partial=True)
on another, one more step equals the uninterrupted run on the saving layout (atol 1e-6),
for a model with tensor-parallel Embeddings (vocabulary and embedding-dim splits),
Linears and a transformer layer (smp.nn.DistributedTransformerLayer), uneven splits included,
and the loaded model and optimizer state equal the saved ones bit for bit
(tests/python/mp/reshard.py).

The default set is a few representative layout pairs (about 4-5 minutes on 2 cores);
the full matrix (every pair of pp {1,2,4} x tp {1,2,4} within 4 ranks, Adam and
SGD-momentum, shard_optimizer_state off/on) runs with SMP_RESHARD_FULL=1 (marker
reshard_full).
"""

import os
import shutil

import pytest

from conftest import run_mpi

pytestmark = pytest.mark.mpi

TIMEOUT = 240


def _save(tmp_path_factory, name, pp, tp, rdp, shard, opt):
    d = tmp_path_factory.mktemp(name)
    run_mpi(pp * tp * rdp, "reshard.py", "save", d, pp, tp, int(shard), opt, timeout=TIMEOUT)
    return d


def _load(d, pp, tp, rdp, shard, opt):
    out = run_mpi(pp * tp * rdp, "reshard.py", "load", d, pp, tp, int(shard), opt,
                  timeout=TIMEOUT)
    assert out.stdout.count("reshard OK") == pp * tp * rdp, out.stdout[-4000:]


@pytest.fixture(scope="module")
def adam_pp2tp2(tmp_path_factory):
    """Adam, pp2 x tp2 x rdp1, shard_optimizer_state off."""
    return _save(tmp_path_factory, "adam_pp2tp2", 2, 2, 1, False, "adam")


@pytest.fixture(scope="module")
def sgd_tp2rdp2_sharded(tmp_path_factory):
    """SGD-momentum, pp1 x tp2 x rdp2, shard_optimizer_state on (v3 files, each
    holding only its owner's optimizer state)."""
    return _save(tmp_path_factory, "sgd_tp2rdp2", 1, 2, 2, True, "sgd")


# (pp, tp, rdp, shard) of the loading layout
@pytest.mark.parametrize("layout", [(1, 4, 1, False), (1, 1, 1, False), (4, 1, 1, False),
                                    (1, 2, 2, True)],
                         ids=["pp1tp4", "pp1tp1", "pp4tp1", "pp1tp2rdp2-shard"])
def test_adam_pp2tp2_to(adam_pp2tp2, layout):
    _load(adam_pp2tp2, *layout, "adam")


@pytest.mark.parametrize("layout", [(1, 2, 2, False), (2, 2, 1, False), (1, 1, 2, True)],
                         ids=["same-layout-shard-off", "pp2tp2", "tp1rdp2-shard"])
def test_sgd_sharded_to(sgd_tp2rdp2_sharded, layout):
    _load(sgd_tp2rdp2_sharded, *layout, "sgd")


def test_resume_from_checkpoint_across_layouts(adam_pp2tp2, sgd_tp2rdp2_sharded):
    """smp.save_checkpoint on one layout, smp.resume_from_checkpoint on another."""
    for d, layout, opt in ((adam_pp2tp2, (1, 4, 1, False), "adam"),
                           (sgd_tp2rdp2_sharded, (2, 2, 1, False), "sgd")):
        pp, tp, rdp, shard = layout
        out = run_mpi(pp * tp * rdp, "reshard.py", "load", d, pp, tp, int(shard), opt, "resume",
                      timeout=TIMEOUT)
        assert out.stdout.count("reshard OK") == pp * tp * rdp, out.stdout[-4000:]


def test_tp2_to_tp4_uneven(tmp_path_factory):
    # Embedding rows 11, columns 5 and Linear inputs 10: uneven under tp 4.
    d = _save(tmp_path_factory, "adam_tp2", 1, 2, 1, False, "adam")
    _load(d, 1, 4, 1, False, "adam")


def test_missing_part_is_named(adam_pp2tp2, tmp_path):
    """A part file removed from the checkpoint: the error names it."""
    d = tmp_path / "broken"
    shutil.copytree(adam_pp2tp2, d)
    os.remove(d / "ckpt.pt_1_1")
    out = run_mpi(4, "reshard.py", "load", d, 1, 4, 0, "adam", timeout=TIMEOUT, expect_rc=1)
    assert "ckpt.pt_1_1" in out.stdout and "does not exist" in out.stdout, out.stdout[-4000:]


# ---- the full matrix (SMP_RESHARD_FULL=1) -------------------------------------------

_LAYOUTS = [(pp, tp) for pp in (1, 2, 4) for tp in (1, 2, 4) if pp * tp <= 4]
_FULL = [(s, t, opt, shard_save, shard_load)
         for s in _LAYOUTS for t in _LAYOUTS if s != t
         for opt in ("adam", "sgd")
         for shard_save, shard_load in ((False, False), (True, True), (False, True),
                                        (True, False))]


@pytest.mark.reshard_full
@pytest.mark.skipif(os.environ.get("SMP_RESHARD_FULL") != "1",
                    reason="the full resharding matrix runs with SMP_RESHARD_FULL=1")
@pytest.mark.parametrize("case", _FULL, ids=lambda c: f"{c[2]}-pp{c[0][0]}tp{c[0][1]}"
                         f"{'s' if c[3] else ''}-to-pp{c[1][0]}tp{c[1][1]}{'s' if c[4] else ''}")
def test_full_matrix(tmp_path_factory, case):
    (spp, stp), (lpp, ltp), opt, shard_save, shard_load = case
    # rdp fills 4 ranks when sharding (so that shard_optimizer_state matters).
    srdp = 4 // (spp * stp) if shard_save else 1
    lrdp = 4 // (lpp * ltp) if shard_load else 1
    key = (spp, stp, srdp, shard_save, opt)
    if key not in _SAVED:
        _SAVED[key] = _save(tmp_path_factory, "full", spp, stp, srdp, shard_save, opt)
    _load(_SAVED[key], lpp, ltp, lrdp, shard_load, opt)


_SAVED = {}  # saved checkpoints of the full matrix, shared by its cases
