"""Safety of checkpoints (issue 14): part identity (swapped parts, a damaged
manifest), completeness of a partial checkpoint on every rank, concurrent saves
to one name, and hostile or damaged files (nesting, memo expansion, zip tricks,
bytes that are not UTF-8, a byte-flip and truncation sweep)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import PYTHON_DIR, TESTS_DIR, ok_ranks, run_mpi_code

# ---- part identity and completeness (tp=2, two ranks) ------------------------

IDENTITY_CODE = r"""
import json, os, shutil, torch, smp
smp.init({"tensor_parallel_degree": 2, "ddp": True})
tp = smp.tp_rank()
root = ROOT
f = os.path.join(root, "ckpt.pt")
smp.save({"w": torch.full((3,), float(tp)), "tp": tp}, f, partial=True)
smp.barrier()
parts = [f + "_0_0", f + "_0_1"]
manifest = f + ".smp_manifest.json"

def expect_error(cls, *needles):
    try:
        got = smp.load(f, partial=True)
    except cls as e:
        msg = str(e)
        for n in needles:
            assert n in msg, (n, msg)
        return msg
    raise AssertionError(f"rank {smp.rank()} loaded {got!r} without error")

# 1. Intact: each rank gets its own part.
assert smp.load(f, partial=True)["tp"] == tp
smp.barrier()

# 2. Parts swapped on disk (a copy script mixing names).
if smp.rank() == 0:
    os.rename(parts[0], f + ".x"); os.rename(parts[1], parts[0]); os.rename(f + ".x", parts[1])
smp.barrier()
expect_error(smp.CorruptCheckpointError, parts[tp], "tp_rank")
smp.barrier()
if smp.rank() == 0:
    os.rename(parts[0], f + ".x"); os.rename(parts[1], parts[0]); os.rename(f + ".x", parts[1])
smp.barrier()
assert smp.load(f, partial=True)["tp"] == tp
smp.barrier()

# 3. One bit flipped in the manifest's tp_rank and in a part name: the checksum.
text = open(manifest).read()
assert '"crc32":' in text, text
for old, new in [('"tp_rank":0', '"tp_rank":1'), ('ckpt.pt_0_0', 'ckpt.pt_0_1')]:
    if smp.rank() == 0:
        open(manifest, "w").write(text.replace(old, new, 1))
    smp.barrier()
    expect_error(smp.CorruptCheckpointError, manifest, "crc32")
    smp.barrier()

# 4. The same flips in a manifest without a checksum (older format): the part's index.
legacy = json.loads(text); del legacy["crc32"]
legacy_text = json.dumps(legacy, separators=(",", ":"))
if smp.rank() == 0:
    open(manifest, "w").write(legacy_text)
smp.barrier()
assert smp.load(f, partial=True)["tp"] == tp
smp.barrier()
if smp.rank() == 0:
    open(manifest, "w").write(legacy_text.replace('"name":"ckpt.pt_0_0"', '"name":"ckpt.pt_0_1"'))
smp.barrier()
if tp == 0:
    expect_error(smp.CorruptCheckpointError, parts[1], "tp_rank 1", "expects tp_rank 0")
else:
    assert smp.load(f, partial=True)["tp"] == 1
smp.barrier()
if smp.rank() == 0:
    open(manifest, "w").write(text)
smp.barrier()

# 5. A missing part: every rank raises the same error naming it.
if smp.rank() == 0:
    os.rename(parts[1], f + ".gone")
smp.barrier()
msg = expect_error(smp.CheckpointError, parts[1], "incomplete checkpoint")
print("MSG", smp.rank(), msg.replace("\n", " "), flush=True)
smp.barrier()
if smp.rank() == 0:
    os.rename(f + ".gone", parts[1])
smp.barrier()
assert smp.load(f, partial=True)["tp"] == tp
print("identity OK", smp.rank(), flush=True)
"""


@pytest.mark.mpi
def test_part_identity_checksum_and_completeness(tmp_path):
    res = run_mpi_code(2, IDENTITY_CODE.replace("ROOT", repr(str(tmp_path))), timeout=180)
    assert ok_ranks(res.stdout, "identity") == [0, 1], res.stdout
    msgs = sorted(line.split(" ", 2)[2] for line in res.stdout.splitlines()
                  if line.startswith("MSG "))
    assert len(msgs) == 2 and msgs[0] == msgs[1], msgs


# ---- concurrent saves to one name -------------------------------------------

SAVER_CODE = r"""
import sys, torch, smp
f, who, n, partial = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if partial:
    smp.init({})
for i in range(n):
    smp.save({"who": who, "i": i, "w": torch.full((1 << 20,), float(who * 1000 + i))}, f,
             partial=partial)
print("saver OK", who, flush=True)
smp.shutdown()
"""


def _python(*args, env=None, timeout=120):
    full = dict(os.environ)
    full["PYTHONPATH"] = str(PYTHON_DIR) + (os.pathsep + full["PYTHONPATH"]
                                            if full.get("PYTHONPATH") else "")
    full.update(env or {})
    return subprocess.Popen([sys.executable, *args], env=full, cwd=str(TESTS_DIR),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-5000:]}", pytrace=False)
    return proc.returncode, out


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_two_processes_saving_one_name_serialise(tmp_path, partial):
    f = str(tmp_path / "ckpt.pt")
    n = 15
    procs = [_python("-c", SAVER_CODE, f, str(who), str(n), "1" if partial else "0")
             for who in (1, 2)]
    results = [_finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0 and "saver OK" in out, out[-5000:]
    # The last save of one of them is what is on disk, complete, and nothing else.
    import smp
    try:
        if partial:
            smp.init({})
        got = smp.load(f, partial=partial)
    finally:
        smp.shutdown()
    assert got["i"] == n - 1 and got["who"] in (1, 2), got
    assert torch.equal(got["w"], torch.full((1 << 20,), float(got["who"] * 1000 + n - 1)))
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_save_waits_for_the_lock_and_fails_clearly(tmp_path, partial):
    import fcntl
    f = str(tmp_path / "ckpt.pt")
    # A leftover of a save that died, cleaned by the next save of that name.
    dead = (f + "_0_0" if partial else f) + ".tmp-00000000deadbeef"
    open(dead, "wb").write(b"x")
    with open(f + ".smp_lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rc, out = _finish(_python("-c", SAVER_CODE, f, "1", "1", "1" if partial else "0",
                                  env={"SMP_CHECKPOINT_TIMEOUT": "2"}))
        assert rc != 0, out
        assert "another save to the same name" in out and f + ".smp_lock" in out, out
        assert os.path.exists(dead)
    rc, out = _finish(_python("-c", SAVER_CODE, f, "1", "1", "1" if partial else "0"))
    assert rc == 0, out
    assert not os.path.exists(dead)
