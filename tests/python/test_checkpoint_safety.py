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
print(f"MSG {smp.rank()} " + msg.replace("\n", " "), flush=True)
smp.barrier()
if smp.rank() == 0:
    os.rename(f + ".gone", parts[1])
smp.barrier()
assert smp.load(f, partial=True)["tp"] == tp
print(f"identity OK {smp.rank()}", flush=True)
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
print(f"saver OK {who}", flush=True)
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


# ---- hostile files -------------------------------------------------------------

def _zip(path, records, aliases=()):
    """A stored ZIP written by hand: records [(name, data)]; aliases
    [(name, target)] add central directory entries pointing at the local
    header of the record `target` (what zipfile cannot write)."""
    import struct
    import zlib
    out = bytearray()
    central = []
    where = {}
    for name, data in records:
        n = name.encode()
        where[name] = (len(out), zlib.crc32(data), len(data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(data),
                           len(data), len(data), len(n), 0) + n + data
    entries = [(name, *where[name]) for name, _ in records]
    entries += [(name, *where[target]) for name, target in aliases]
    for name, offset, crc, size in entries:
        n = name.encode()
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc,
                                   size, size, len(n), 0, 0, 0, 0, 0, offset) + n)
    cd = b"".join(central)
    cd_offset = len(out)
    out += cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(cd),
                            cd_offset, 0)
    with open(path, "wb") as fh:
        fh.write(bytes(out))
    return path


def _pkl(body):
    return b"\x80\x02" + body + b"."


def _archive(path, pkl, data=()):
    return _zip(path, [("a/data.pkl", pkl), ("a/version", b"3\n")] +
                [(f"a/data/{k}", v) for k, v in data])


def _load_error(smp, path):
    with pytest.raises(smp.CheckpointError) as info:
        smp.load(path, partial=False)
    assert path in str(info.value), str(info.value)
    return info.value


def _storage_tensor(key, numel, size, stride, memo=0):
    """_rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), 0, size, stride,
    False, OrderedDict()) as protocol-2 opcodes."""
    def ints(xs):
        return b"(" + b"".join(b"\x8a\x08" + x.to_bytes(8, "little", signed=True) for x in xs) + b"t"
    k = key.encode()
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" +
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + len(k).to_bytes(4, "little") + k +
            b"X\x03\x00\x00\x00cpu\x8a\x08" + numel.to_bytes(8, "little", signed=True) + b"tQ" +
            b"K\x00" + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR")


def test_deep_nesting_is_a_clear_error_not_a_crash(tmp_path):
    levels = 200_000
    pkl = _pkl(b"]" * levels + b"a" * (levels - 1))
    path = _archive(str(tmp_path / "deep.pt"), pkl)
    code = textwrap.dedent(f"""
        import smp
        try:
            smp.load({path!r}, partial=False)
        except smp.CheckpointError as e:
            assert "deeper than 5000 levels" in str(e) and {path!r} in str(e), str(e)
            print("deep OK")
    """)
    rc, out = _finish(_python("-c", code))
    assert rc == 0 and "deep OK" in out, f"exit status {rc}\n{out[-3000:]}"


def test_memo_reuse_is_bounded_by_the_file_size(smp_single, tmp_path):
    body = b"]r\x00\x00\x00\x00"  # [] memo 0
    depth = 40
    for k in range(1, depth + 1):
        prev = (k - 1).to_bytes(4, "little")
        body += b"]j" + prev + b"aj" + prev + b"ar" + k.to_bytes(4, "little")
    path = _archive(str(tmp_path / "memo.pt"), _pkl(body))
    err = _load_error(smp_single, path)
    assert isinstance(err, smp_single.CorruptCheckpointError) and "expands to more" in str(err)


def test_zip_entries_sharing_one_record_are_refused(smp_single, tmp_path):
    import zipfile
    n = 20
    pkl = _pkl(b"(" + b"".join(_storage_tensor(str(k), 1024, [1024], [1]) for k in range(n)) + b"l")
    data = b"\0" * 4096
    path = _zip(str(tmp_path / "alias.pt"), [("a/data.pkl", pkl), ("a/version", b"3\n"),
                                            ("a/data/0", data)],
                aliases=[(f"a/data/{k}", "a/data/0") for k in range(1, n)])
    assert len(zipfile.ZipFile(path).namelist()) == n + 2
    err = _load_error(smp_single, path)
    assert isinstance(err, smp_single.CorruptCheckpointError) and "overlap" in str(err), str(err)
    # Two directory entries with one name.
    path = _zip(str(tmp_path / "dup.pt"), [("a/data.pkl", pkl[:0] + _pkl(b"N")),
                                          ("a/version", b"3\n")],
                aliases=[("a/data.pkl", "a/version")])
    err = _load_error(smp_single, path)
    assert "two central directory entries are named 'a/data.pkl'" in str(err), str(err)
    # A control: the same writer without tricks loads.
    ok = _archive(str(tmp_path / "ok.pt"), _pkl(_storage_tensor("0", 1024, [1024], [1])),
                  [("0", data)])
    assert torch.equal(smp_single.load(ok, partial=False), torch.zeros(1024))


def test_size_stride_overflow_is_corrupt_not_a_torch_error(smp_single, tmp_path):
    path = _archive(str(tmp_path / "ovf.pt"),
                    _pkl(_storage_tensor("0", 4, [2 ** 62, 4], [4, 2 ** 62])),
                    [("0", b"\0" * 16)])
    err = _load_error(smp_single, path)
    assert isinstance(err, smp_single.CorruptCheckpointError) and "overflows" in str(err), str(err)
    path = _archive(str(tmp_path / "numel.pt"), _pkl(_storage_tensor("0", 2 ** 62, [1], [1])),
                    [("0", b"")])
    err = _load_error(smp_single, path)
    assert isinstance(err, smp_single.CorruptCheckpointError), str(err)


def test_non_utf8_bytes_in_an_error_are_escaped(smp_single, tmp_path):
    # A storage key that is not UTF-8, whose record is missing: the message quotes it.
    pkl = _pkl(_storage_tensor("0", 4, [4], [1]).replace(b"X\x01\x00\x00\x000", b"X\x02\x00\x00\x00\xff\xfe"))
    path = _archive(str(tmp_path / "bytes.pt"), pkl)
    err = _load_error(smp_single, path)
    assert isinstance(err, smp_single.CorruptCheckpointError), repr(err)
    assert "\\xff" in str(err), str(err)


# ---- the gather_to_rank0 misuse ------------------------------------------------

GATHER_CODE = r"""
import torch, smp
smp.init({"tensor_parallel_degree": 2, "ddp": True})
with smp.tensor_parallelism():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
model = smp.DistributedModel(net)
if smp.dp_rank() == 0:  # the mistake: must be rdp_rank() == 0
    try:
        model.state_dict(gather_to_rank0=True)
        print("NOERROR", smp.rank(), flush=True)
    except smp.CommTimeoutError as e:
        msg = str(e)
        assert "rdp_rank() == 0" in msg and "never called it" in msg, msg
        print(f"gather OK {smp.rank()} " + msg.replace("\n", " "), flush=True)
else:
    print("skipped", smp.rank(), "rdp", smp.rdp_rank(), "tp", smp.tp_rank(), flush=True)
smp.barrier()
"""


@pytest.mark.mpi
def test_gather_to_rank0_under_the_wrong_guard_raises_with_the_hint():
    res = run_mpi_code(4, GATHER_CODE, env={"SMP_CHECKPOINT_TIMEOUT": "3"}, timeout=180)
    assert "NOERROR" not in res.stdout, res.stdout
    assert ok_ranks(res.stdout, "gather"), res.stdout


# ---- every byte: flips and truncations -----------------------------------------

SWEEP_CODE = r"""
import os, sys, time, torch, smp
root = sys.argv[1]
smp.init({})
f = os.path.join(root, "ck.pt")
obj = {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                 "b": torch.tensor([1.5, -2.0])},
       "step": 7, "name": "sweep", "lr": 0.01, "flags": [True, None, (1, 2)]}
smp.save(obj, f, partial=True)
part, manifest = f + "_0_0", f + ".smp_manifest.json"

def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b

assert same(smp.load(f, partial=True), obj)
counts = {"identical": 0, "error": 0}
bad = []

def attempt(what):
    try:
        got = smp.load(f, partial=True)
    except smp.CheckpointError as e:
        if f not in str(e):
            bad.append(f"{what}: error not naming the file: {e}")
        counts["error"] += 1
        return
    except Exception as e:  # anything else is a failure of the reader
        bad.append(f"{what}: {type(e).__name__}: {e}")
        return
    if same(got, obj):
        counts["identical"] += 1
    else:
        bad.append(f"{what}: loaded different data silently")

t0 = time.time()
for path in (part, manifest):
    original = open(path, "rb").read()
    n = len(original)
    # Every byte of the structure (local headers, data.pkl, smp/index.json, the
    # other small records, the central directory and its end; all of the
    # manifest) and every 53rd byte of the rest (padding, tensor data).
    dense = set(range(0, n, 53))
    if path == part:
        import struct, zipfile
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            cd_start = min(n, z.start_dir)
        for info in infos:
            h = info.header_offset
            nlen, elen = struct.unpack("<HH", original[h + 26:h + 30])
            dense.update(range(h, h + 30 + nlen))  # local header and name (not the padding)
            if not info.filename.split("/", 1)[1].startswith("data/"):
                start = h + 30 + nlen + elen
                dense.update(range(start, start + info.file_size))
        dense.update(range(cd_start, n))
    else:
        dense.update(range(n))
    positions = sorted(dense)
    for i in positions:
        data = bytearray(original)
        data[i] ^= 1 << (i % 8)
        open(path, "wb").write(data)
        attempt(f"{os.path.basename(path)} byte {i} ^ {1 << (i % 8)}")
    for cut in sorted(set(list(range(0, n, max(1, n // 47))) + [n - 1, n - 22, n // 2])):
        if 0 <= cut < n:
            open(path, "wb").write(original[:cut])
            attempt(f"{os.path.basename(path)} truncated to {cut}")
    open(path, "wb").write(original)
    print("SWEPT", os.path.basename(path), n, "bytes,", len(positions), "flips", flush=True)
assert same(smp.load(f, partial=True), obj)
print("COUNTS", counts, "in", round(time.time() - t0, 1), "s", flush=True)
for b in bad[:30]:
    print("BAD", b, flush=True)
print("sweep", "OK" if not bad else "FAILED", 0, flush=True)
smp.shutdown()
"""


def test_byte_flip_and_truncation_sweep(tmp_path):
    rc, out = _finish(_python("-c", SWEEP_CODE, str(tmp_path)), timeout=300)
    assert rc == 0, f"exit status {rc} (a crash?)\n{out[-5000:]}"
    assert ok_ranks(out, "sweep") == [0], out[-5000:]
    assert "COUNTS" in out, out[-3000:]
    print("\n".join(line for line in out.splitlines() if line.startswith(("SWEPT", "COUNTS"))))
