"""Crash safety and I/O faults of checkpoint saves (issue 14), under mpirun with
tensor_parallel_degree 2 on the CPU, through the fault hook of the I/O layer
(SMP_FAULT_POINT, src/checkpoint/io.cc):

- kill -9 of one rank at points spread over smp.save (partial, full, async) and
  smp.save_checkpoint (sync and async, overwriting the same tag): afterwards every
  rank loads the previous checkpoint or the new one, exactly and the same version
  on every rank (`newest` included), and the next save leaves no temporary;
- ENOSPC and EIO from pwrite and fsync: every participant raises an error naming
  the file and the rank, the previous checkpoint loads exactly, no temporary is
  left.

SMP_FAULT_SWEEP=all runs every kill point (the CI sample is the default);
docs/file_format.md §12 lists them."""

import os
import shutil

import pytest

from conftest import run_mpi

TP2 = 2

# (name, case, faulted rank, SMP_FAULT_POINT)
KILL_POINTS = [
    # smp.save(partial=True): part write, part fsync, manifest (the commit point), renames
    ("p_write1", "partial", 0, "write:1"),
    ("p_write3", "partial", 1, "write:3"),
    ("p_wafter2", "partial", 0, "write.after:2"),
    ("p_fsync", "partial", 1, "fsync:1"),
    ("p_mfsync", "partial", 0, "fsync:1@smp_manifest"),
    ("p_mrename", "partial", 0, "rename:1@smp_manifest"),
    ("p_mrenamed", "partial", 0, "rename.after:1@smp_manifest"),
    ("p_rename_r1", "partial", 1, "rename:1"),
    ("p_dirsync", "partial", 0, "dirsync:2"),
    # smp.save(partial=False)
    ("f_write1", "full", 0, "write:1"),
    ("f_wafter2", "full", 0, "write.after:2"),
    ("f_fsync", "full", 0, "fsync:1"),
    ("f_rename", "full", 0, "rename:1"),
    ("f_renamed", "full", 0, "rename.after:1"),
    # smp.save(async_save=True): the background thread
    ("a_write2", "async", 1, "write:2"),
    ("a_mfsync", "async", 0, "fsync:1@smp_manifest"),
    ("a_mrenamed", "async", 0, "rename.after:1@smp_manifest"),
    ("a_renamed_r1", "async", 1, "rename.after:1"),
    # smp.save_checkpoint, overwriting tag "t": model, optimizer, user content,
    # config, the staging folder's exchange, `newest`
    ("c_model_commit", "ckpt", 0, "rename:1@model.smp_manifest"),
    ("c_model_done_r1", "ckpt", 1, "rename.after:1@model"),
    ("c_opt_write", "ckpt", 0, "write:1@optimizer_states"),
    ("c_opt_commit", "ckpt", 0, "rename.after:1@optimizer_states.smp_manifest"),
    ("c_user_content", "ckpt", 0, "create:1@user_content"),
    ("c_config", "ckpt", 0, "rename:1@smp_config"),
    ("c_exchange", "ckpt", 0, "exchange:1"),
    ("c_exchanged", "ckpt", 0, "exchange.after:1"),
    ("c_newest", "ckpt", 0, "rename:1@newest"),
    ("ca_opt_fsync_r1", "ckpt_async", 1, "fsync:1@optimizer_states"),
    ("ca_exchange", "ckpt_async", 0, "exchange:1"),
    ("ca_newest", "ckpt_async", 0, "rename.after:1@newest"),
]

# The CI sample (>= 20 points, every case, both ranks); SMP_FAULT_SWEEP=all runs all.
CI_SAMPLE = {
    "p_write1", "p_write3", "p_fsync", "p_mfsync", "p_mrename", "p_mrenamed", "p_rename_r1",
    "f_write1", "f_fsync", "f_rename", "f_renamed",
    "a_write2", "a_mfsync", "a_mrenamed",
    "c_model_commit", "c_model_done_r1", "c_opt_write", "c_opt_commit", "c_config",
    "c_exchange", "c_exchanged", "c_newest",
    "ca_opt_fsync_r1", "ca_exchange",
}


def _points():
    if os.environ.get("SMP_FAULT_SWEEP") == "all":
        return KILL_POINTS
    return [p for p in KILL_POINTS if p[0] in CI_SAMPLE]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Version 1 of every case, saved once and copied for each point."""
    root = tmp_path_factory.mktemp("fault_template")
    run_mpi(TP2, "ckpt_faults.py", "setup", root, timeout=180)
    return root


def _fault_env(rank, spec):
    return {"SMP_TEST_FAULT": spec, "SMP_TEST_FAULT_RANK": str(rank),
            "SMP_CHECKPOINT_TIMEOUT": "20"}


def test_kill_at_points_spread_over_the_saves(template, tmp_path):
    points = _points()
    assert len(points) >= 20
    for name, case, rank, spec in points:
        d = tmp_path / name
        shutil.copytree(template / case, d)
        res = run_mpi(TP2, "ckpt_faults.py", "fault", d, case, env=_fault_env(rank, spec),
                      timeout=120, expect_rc=1)
        assert "FAULT NOT HIT" not in res.stdout and "SMP_FAULT_POINT" in res.stdout, \
            f"{name}: the fault point {spec} was not reached\n{res.stdout[-4000:]}"
    res = run_mpi(TP2, "ckpt_faults.py", "verify", tmp_path,
                  *[f"{name}={case}" for name, case, _, _ in points], timeout=240)
    assert res.stdout.count("faults verify OK") == TP2, res.stdout[-4000:]
    for name, _, _, _ in points:
        assert f"VERIFIED {name} " in res.stdout, res.stdout[-4000:]


IO_ERRORS = [
    ("p_write_enospc", "partial", 1, "write:2:enospc"),
    ("p_fsync_eio", "partial", 0, "fsync:1:eio"),
    ("p_manifest_enospc", "partial", 0, "write:1:enospc@smp_manifest"),
    ("f_write_eio", "full", 0, "write:1:eio"),
    ("f_fsync_enospc", "full", 0, "fsync:1:enospc"),
    ("a_write_eio", "async", 1, "write:1:eio"),
    ("c_opt_fsync_enospc", "ckpt", 1, "fsync:1:enospc@optimizer_states"),
]


@pytest.mark.parametrize("name,case,rank,spec", IO_ERRORS, ids=[p[0] for p in IO_ERRORS])
def test_io_errors_raise_on_every_rank_and_keep_the_old_checkpoint(template, tmp_path, name,
                                                                   case, rank, spec):
    d = tmp_path / name
    shutil.copytree(template / case, d)
    res = run_mpi(TP2, "ckpt_faults.py", "ioerror", d, case, env=_fault_env(rank, spec),
                  timeout=150)
    out = res.stdout
    want = "No space left on device" if "enospc" in spec else "Input/output error"
    participants = [0] if case == "full" else [0, 1]
    for r in participants:
        assert f"IOERROR rank {r}:" in out, out[-4000:]
    lines = [ln for ln in out.splitlines() if "IOERROR rank" in ln]
    for ln in lines:
        # the cause, the file and the failing rank, on every participant
        assert want in ln and f"rank {rank}" in ln and str(d) in ln, ln
    assert out.count("faults ioerror OK") == TP2, out[-4000:]


# ---- a reader racing a save (two processes) -------------------------------------

RACE_SAVER = r"""
import os, sys, torch, smp
smp.init({})
f = sys.argv[1]
n = int(sys.argv[2])
for v in range(1, n + 1):
    smp.save({"v": v, "a": torch.full((4096,), float(v)), "b": torch.full((64,), -float(v))},
             f, partial=True)
    if v == 1:
        open(f + ".ready", "w").close()
smp.shutdown()
print("SAVER DONE", flush=True)
"""

RACE_READER = r"""
import os, sys, time, torch, smp
smp.init({})
f = sys.argv[1]
while not os.path.exists(f + ".ready"):
    time.sleep(0.01)
loads, versions = 0, set()
while True:
    done = os.path.exists(f + ".done")
    got = smp.load(f, partial=True)
    v = got["v"]
    assert torch.equal(got["a"], torch.full((4096,), float(v))), f"mixed data in version {v}"
    assert torch.equal(got["b"], torch.full((64,), -float(v))), f"mixed data in version {v}"
    loads += 1
    versions.add(v)
    if done:
        break
smp.shutdown()
print(f"READER OK loads={loads} versions={len(versions)}", flush=True)
"""


def test_a_reader_racing_saves_sees_one_whole_checkpoint(tmp_path):
    """One process saves 150 versions of a partial checkpoint while another loads it
    in a loop: every load returns one whole version (never an error on a temporary
    renamed away, never a mix)."""
    import subprocess
    import sys

    from conftest import _env

    f = str(tmp_path / "race.pt")
    env = _env({"SMP_CHECKPOINT_TIMEOUT": "30"})
    env.pop("OMPI_COMM_WORLD_RANK", None)
    saver = subprocess.Popen([sys.executable, "-c", RACE_SAVER, f, "150"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    reader = subprocess.Popen([sys.executable, "-c", RACE_READER, f], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        s_out, _ = saver.communicate(timeout=180)
        open(f + ".done", "w").close()
        r_out, _ = reader.communicate(timeout=60)
    finally:
        for p in (saver, reader):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert saver.returncode == 0 and "SAVER DONE" in s_out, s_out[-4000:]
    assert reader.returncode == 0 and "READER OK" in r_out, r_out[-4000:]


# ---- shutdown after a caught collective error --------------------------------------

CAUGHT_CODE = r"""
import smp
smp.init({"tensor_parallel_degree": 2, "ddp": True})
if smp.rank() == 0:
    try:
        smp.allgather(1, smp.CommGroup.WORLD)  # rank 1 never joins
        raise AssertionError("the lone allgather completed")
    except smp.CommError as e:
        print("caught on rank 0: " + type(e).__name__, flush=True)
r = smp.rank()
smp.shutdown()
print(f"shutdown returned {r}", flush=True)
"""


def test_shutdown_after_a_caught_collective_error_does_not_wait_again():
    """SMP_ABORT_ON_EXCEPTION=0, a collective that times out on rank 0 and is
    caught: smp.shutdown returns on both ranks without waiting for the broken
    groups (before: the final barrier waited a second full SMP_COMM_TIMEOUT and
    failed)."""
    from conftest import run_mpi_code

    res = run_mpi_code(2, CAUGHT_CODE, env={"SMP_ABORT_ON_EXCEPTION": "0",
                                            "SMP_COMM_TIMEOUT": "8"}, timeout=120)
    out = res.stdout
    assert "caught on rank 0: CommTimeoutError" in out, out[-4000:]
    assert "shutdown returned 0" in out and "shutdown returned 1" in out, out[-4000:]
    assert "final barrier failed" not in out, out[-4000:]
