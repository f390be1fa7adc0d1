"""The checkpoint file format against stock PyTorch.

Files written by smp's C++ writer (through the smp_ckpt_fixture executable)
must load with `torch.load(f, weights_only=True)` as exactly the object the
fixture saved (built here again in Python), and files written by `torch.save`
must be read by smp's restricted reader (`smp_ckpt_fixture dump`), which must
refuse anything that is not plain data.

The executable is looked up in $SMP_BUILD_DIR/tests (default: <repo>/build).
"""

import collections
import math
import os
import pickle
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("SMP_BUILD_DIR", REPO_ROOT / "build"))
FIXTURE_EXE = BUILD_DIR / "tests" / "smp_ckpt_fixture"

pytestmark = pytest.mark.skipif(
    not FIXTURE_EXE.exists(),
    reason=f"{FIXTURE_EXE} is not built (cmake --build <build> --target smp_ckpt_fixture; "
    "set SMP_BUILD_DIR to the build directory)",
)

REFUSAL = ("safe loading refuses to run code from a checkpoint; if you trust this file, "
           "load it with weights_only=False")


def run_fixture(*args, expect_rc=0):
    p = subprocess.run([str(FIXTURE_EXE), *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == expect_rc, f"rc {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("smp_ckpt_fixtures")
    run_fixture("write", d)
    return d


# ---- the objects the fixture writes (tests/cpp/checkpoint/fixtures.h) ----------

def every_dtype():
    return {
        "float32": torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1,
        "float64": torch.arange(6, dtype=torch.float64) / 3,
        "float16": torch.arange(5, dtype=torch.float16) * 0.25,
        "bfloat16": torch.arange(7, dtype=torch.bfloat16) - 3,
        "int8": torch.arange(-4, 4, dtype=torch.int8),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "int16": torch.arange(-300, 300, 100, dtype=torch.int16),
        "int32": torch.arange(10, dtype=torch.int32).reshape(2, 5) * 100000,
        "int64": torch.arange(4, dtype=torch.int64) * 4000000000,
        "bool": torch.arange(6).remainder(2).eq(0),
        "complex64": torch.complex(torch.arange(3, dtype=torch.float32),
                                   torch.arange(3, dtype=torch.float32) + 1),
        "complex128": torch.complex(torch.arange(2, dtype=torch.float64),
                                    torch.arange(2, dtype=torch.float64) - 1),
    }


def everything():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = collections.OrderedDict([
        ("layer.weight", base.t()),
        ("layer.bias", torch.arange(10, dtype=torch.float64)[1:9:3]),
        ("row", base[2]),
    ])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "none": None,
        "true": True,
        "false": False,
        "ints": [0, 1, 255, 256, 65535, 65536, -1, -5, 2147483647, -2147483648, 2147483648,
                 4294967296, -4294967296, 9223372036854775807, -9223372036854775808],
        "floats": [0.0, -0.0, 1.5, -2.25, 1e300, 1e-300, 0.1, math.inf, -math.inf],
        "str": "caf\u00e9 \u2713 \"quoted\"\n",
        "empty_str": "",
        "bytes": b"\x00\x01\x7f\x80\xff abc",
        "empty_bytes": b"",
        "tuple0": (),
        "tuple1": (1,),
        "tuple2": (1, "two"),
        "tuple3": (1, 2.0, None),
        "tuple5": (1, 2, 3, 4, 5),
        "list": [[], {}, [()]],
        7: "int key",
        (1, "a"): "tuple key",
        "dtypes": every_dtype(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "state_dict": sd,
    }


def tied():
    w = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    return collections.OrderedDict([
        ("encoder.weight", w), ("decoder.weight", w), ("alias", w.view(2, 4)),
        ("other", torch.ones(3)),
    ])


# ---- exact comparison and the canonical dump --------------------------------

def assert_same(a, b, path="<root>"):
    """a == b with types: dict vs OrderedDict, tuple vs list, key order,
    OrderedDict attributes, tensors by dtype, shape and bytes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor values differ"
        assert a.requires_grad == b.requires_grad, path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
        assert getattr(a, "__dict__", {}).keys() == getattr(b, "__dict__", {}).keys(), path
        for k in getattr(a, "__dict__", {}):
            assert_same(a.__dict__[k], b.__dict__[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert (math.copysign(1, a), a) == (math.copysign(1, b), b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def tensor_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


DTYPE_NAMES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16",
    torch.int32: "int32", torch.int64: "int64", torch.bool: "bool",
    torch.complex64: "complex64", torch.complex128: "complex128",
}


def canonical(v):
    """The dump `smp_ckpt_fixture dump` prints (canonical() in fixture_main.cc)."""
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "f:" + "%.17g" % v
    if isinstance(v, str):
        return "s:" + v.encode("utf-8").hex()
    if isinstance(v, bytes):
        return "b:" + v.hex()
    if isinstance(v, list):
        return "[" + ", ".join(canonical(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(canonical(x) for x in v) + ")"
    if isinstance(v, dict):
        ordered = isinstance(v, collections.OrderedDict)
        s = ("OrderedDict{" if ordered else "{") + ", ".join(
            f"{canonical(k)}: {canonical(x)}" for k, x in v.items()) + "}"
        if ordered and getattr(v, "__dict__", None):
            s += "#attrs" + canonical(dict(v.__dict__))
        return s
    if isinstance(v, torch.Tensor):
        crc = zlib.crc32(tensor_bytes(v))
        return f"tensor({DTYPE_NAMES[v.dtype]}, [{', '.join(map(str, v.shape))}], crc32=0x{crc:08x})"
    raise TypeError(f"no canonical form for {type(v)}")


# ---- smp files -> torch.load ------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["everything", "zip64"])
def test_torch_load_returns_the_saved_object(fixtures, name):
    loaded = torch.load(fixtures / f"{name}.pt", weights_only=True)
    assert_same(loaded, everything())


@pytest.mark.timeout(120)
def test_torch_load_mmap_and_computed_offsets(fixtures):
    # mmap reads records at their offsets; calculate_storage_offsets makes
    # torch compute them the way its own writer lays files out.
    code = (
        "import sys, torch\n"
        "from torch.utils.serialization import config\n"
        "config.load.calculate_storage_offsets = True\n"
        "for f in sys.argv[1:]:\n"
        "    torch.load(f, weights_only=True, mmap=True)\n"
        "    torch.load(f, weights_only=True, map_location='meta')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TORCH_SERIALIZATION_DEBUG="1")
    files = [fixtures / f for f in ("everything.pt", "tied.pt", "big.pt", "sharded.pt")]
    p = subprocess.run(["python3", "-c", code, *map(str, files)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr
    loaded = torch.load(fixtures / "everything.pt", weights_only=True, mmap=True)
    assert_same(loaded, everything())


@pytest.mark.timeout(120)
def test_tied_tensors(fixtures):
    loaded = torch.load(fixtures / "tied.pt", weights_only=True)
    assert_same(loaded, tied())
    assert loaded["encoder.weight"] is loaded["decoder.weight"]
    assert loaded["alias"] is not loaded["encoder.weight"]
    assert loaded["alias"].untyped_storage().data_ptr() == loaded["encoder.weight"].untyped_storage().data_ptr()


@pytest.mark.timeout(120)
def test_big_and_sharded(fixtures):
    big = torch.load(fixtures / "big.pt", weights_only=True)
    assert_same(big, collections.OrderedDict([
        ("a", torch.arange(5 << 20, dtype=torch.float32)),
        ("b", torch.arange(1000, dtype=torch.int64)),
        ("c", torch.arange(3, dtype=torch.float32))]))
    sharded = torch.load(fixtures / "sharded.pt", weights_only=True)
    assert_same(sharded, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    index = run_fixture("index", fixtures / "sharded.pt").stdout
    assert "has_index 1" in index and "w key=0 dtype=float32" in index and "shard=dim1:1/2" in index


@pytest.mark.timeout(120)
def test_layout_is_torch_like(fixtures):
    with zipfile.ZipFile(fixtures / "everything.pt") as z:
        names = z.namelist()
        assert names[0] == "everything/data.pkl"
        for rec, want in ((".format_version", b"1"), (".storage_alignment", b"4096"),
                          ("byteorder", b"little"), ("version", b"3\n")):
            assert z.read(f"everything/{rec}") == want
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.testzip() is None  # every CRC-32 checks
        import json
        index = json.loads(z.read("everything/smp/index.json"))
    assert index["format"] == "smp.checkpoint" and index["format_version"] == 1
    raw = (fixtures / "everything.pt").read_bytes()
    for t in index["tensors"]:
        assert t["offset"] % 4096 == 0
        assert zlib.crc32(raw[t["offset"]:t["offset"] + t["nbytes"]]) == t["crc32"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["everything", "tied", "zip64", "sharded"])
def test_smp_reader_dump_matches(fixtures, name):
    expected = {"everything": everything, "zip64": everything, "tied": tied,
                "sharded": lambda: {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}}[name]()
    assert run_fixture("dump", fixtures / f"{name}.pt").stdout.strip() == canonical(expected)


# ---- torch.save files -> smp reader ------------------------------------------

def trained_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
            "epoch": 3, "note": "torch.save", "blob": b"\x00\xff"}


@pytest.mark.timeout(120)
def test_torch_save_files_are_read(tmp_path):
    obj = trained_state()
    f = tmp_path / "model_0_0.pt"
    torch.save(obj, f)
    assert run_fixture("dump", f).stdout.strip() == canonical(obj)
    index = run_fixture("index", f).stdout
    assert "has_index 0" in index
    assert "model_state_dict/0.weight key=0 dtype=float32" in index
    assert "optimizer_state_dict/state/0/exp_avg" in index
    # Views into a shared storage (torch.save keeps them strided).
    base = torch.arange(20.0).reshape(4, 5)
    views = {"t": base.t(), "col": base[:, 1], "base": base}
    torch.save(views, tmp_path / "views.pt")
    assert run_fixture("dump", tmp_path / "views.pt").stdout.strip() == canonical(views)


class Arbitrary:
    def __init__(self):
        self.x = 1


@pytest.mark.timeout(120)
def test_arbitrary_objects_are_refused(tmp_path):
    f = tmp_path / "obj.pt"
    torch.save({"ok": torch.ones(2), "obj": Arbitrary()}, f)
    p = run_fixture("dump", f, expect_rc=1)
    assert f"'{__name__} Arbitrary'" in p.stderr and REFUSAL in p.stderr, p.stderr

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Evil(), protocol=2)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", data)
        z.writestr("evil/version", "3\n")
    p = run_fixture("dump", evil, expect_rc=1)
    assert "'posix system'" in p.stderr and REFUSAL in p.stderr, p.stderr
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    p = run_fixture("dump", f, expect_rc=1)
    assert f"'{f}' is not an smp or torch checkpoint" in p.stderr, p.stderr
