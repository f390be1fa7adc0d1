"""smp.save / smp.load / save_checkpoint / resume_from_checkpoint under mpirun
(tests/python/mp/ckpt_engine.py does the checking on every rank)."""

from conftest import ok_ranks, run_mpi


def test_checkpoint_engine_np4(tmp_path):
    out = run_mpi(4, "ckpt_engine.py", tmp_path, env={"SMP_LOG_LEVEL": "info"}).stdout
    assert ok_ranks(out, "ckpt_engine") == [0, 1, 2, 3], out[-20000:]
    # Every save and load is logged with bytes, time, GB/s and its phases.
    assert "smp.save '" in out and "GB/s); serialize" in out and "rendezvous" in out, out[-5000:]
    assert "smp.load '" in out and "open/verify" in out, out[-5000:]
    # The torch.save fallback names the first key smp's format does not hold.
    assert "UserThing at key '/thing' is not a tensor, container or primitive" in out, out[-5000:]
