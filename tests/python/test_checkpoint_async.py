"""Asynchronous smp.save: snapshot isolation, a background error reaching the
caller (naming file and rank), process exit waiting for the save in flight,
and the collective forms (smp.save, save_checkpoint) under mpirun."""

import re
import sys
import textwrap

import pytest
import torch

from conftest import PROCESS_TIMEOUT_S, _env, _run, ok_ranks, run_mpi_code

import smp


def test_snapshot_isolation(tmp_path):
    w = torch.rand(512, 513, requires_grad=True)
    b = torch.rand(100)
    state = {"w": w, "b": b, "tied": w, "view": b[10:20], "t": b.view(10, 10).t(), "step": 3,
             "bf16": torch.rand(7).bfloat16(), "empty": torch.empty(0, 3)}
    want = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in state.items()}
    f = tmp_path / "m.pt"
    h = smp.save(state, f, partial=False, async_save=True)
    # Training changes the parameters right after the call.
    with torch.no_grad():
        w.add_(1.0)
        b.zero_()
        state["bf16"].fill_(5)
    stats = h.wait()
    assert h.done()
    assert stats["file"] == str(f) and stats["snapshot_bytes"] >= w.nbytes + b.nbytes
    for back in (torch.load(f, weights_only=True), smp.load(f, partial=False)):
        assert list(back) == list(want)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
            else:
                assert back[k] == v, k
        assert back["w"].requires_grad and not back["b"].requires_grad
        assert back["w"] is back["tied"]


def test_background_error_reaches_wait_and_next_save(tmp_path):
    bad = tmp_path / "missing_dir" / "m.pt"
    where = re.escape(f"'{bad}' failed in the background on rank 0")
    h = smp.async_save({"x": torch.ones(3)}, bad, partial=False)
    with pytest.raises(smp.CheckpointError, match=where):
        h.wait()
    h.wait()  # reported once
    h = smp.async_save({"x": torch.ones(3)}, bad, partial=False)
    with pytest.raises(smp.CheckpointError, match=where):
        smp.save({"y": 1}, tmp_path / "next.pt", partial=False)
    smp.save({"y": 1}, tmp_path / "next.pt", partial=False)  # reported once
    assert smp.load(tmp_path / "next.pt", partial=False) == {"y": 1}


def test_process_exit_waits_for_the_save_in_flight(tmp_path):
    f = tmp_path / "exit.pt"
    code = textwrap.dedent(f"""
        import torch, smp
        state = {{"w%d" % i: torch.full((4 << 20,), float(i)) for i in range(12)}}  # 192 MB
        h = smp.async_save(state, {str(f)!r}, partial=False)
        print("returned before the write:", not h.done(), flush=True)
        # exits here, the save still in flight
    """)
    out = _run([sys.executable, "-c", code], _env({}), PROCESS_TIMEOUT_S).stdout
    assert "returned before the write" in out, out
    back = torch.load(f, weights_only=True)
    assert sorted(back) == sorted(f"w{i}" for i in range(12))
    for i in range(12):
        assert torch.equal(back[f"w{i}"], torch.full((4 << 20,), float(i))), i


MP_CODE = textwrap.dedent("""
    import os, torch, smp
    smp.init({"pipeline_parallel_degree": 1, "tensor_parallel_degree": 2, "ddp": True})
    r = smp.rank()
    D = os.environ["CKPT_DIR"]
    t = torch.full((300000,), float(r))
    h = smp.save({"t": t, "r": r}, D + "/m", partial=True, async_save=True)
    t.fill_(-1.0)
    # The main thread's collectives go on while the background commits through the store.
    for i in range(20):
        assert smp.allgather((r, i), smp.WORLD) == [(0, i), (1, i)]
        smp.barrier()
    stats = h.wait()
    assert stats["file"].endswith("m_0_%d" % smp.tp_rank()), stats
    back = smp.load(D + "/m", partial=True)
    assert back["r"] == r and torch.equal(back["t"], torch.full((300000,), float(r)))

    class Model:  # what save_checkpoint needs of a model
        def __init__(self):
            self.w = torch.full((1000,), 10.0 + r)
        def local_state_dict(self):
            return {"w": self.w}

    m = Model()
    for step in (1, 2):
        h = smp.save_checkpoint(D + "/ck", tag=f"step{step}", model=m, async_save=True,
                                num_kept_partial_checkpoints=1)
        m.w.add_(100.0)  # not in the checkpoint of this step
    h.wait()
    smp.barrier()  # rank 0 updates `newest` when its saves are committed
    smp.wait_for_pending_saves()
    smp.barrier()
    with open(D + "/ck/newest") as fd:
        assert fd.read().split() == ["step2_partial"]
    assert not os.path.exists(D + "/ck/step1_partial")
    got = smp.load(D + "/ck/step2_partial/model.pt", partial=True)
    assert torch.equal(got["w"], torch.full((1000,), 110.0 + r)), got["w"][:3]
    print(f"ckpt_async OK {r}", flush=True)
    smp.shutdown()
""")


def test_collective_async_save_np2(tmp_path):
    out = run_mpi_code(2, MP_CODE, env={"CKPT_DIR": str(tmp_path)}).stdout
    assert ok_ranks(out, "ckpt_async") == [0, 1], out[-20000:]
