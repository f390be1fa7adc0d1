# mpirun -np 4, pp 1 x tp 2 x rdp 2: smp.save / smp.load and save_checkpoint /
# resume_from_checkpoint against stock torch.save / torch.load.
# argv[1]: a directory shared by all ranks (empty).
import collections
import glob
import logging
import math
import os
import sys

import numpy as np
import torch

import smp

smp.init({"pipeline_parallel_degree": 1, "tensor_parallel_degree": 2, "ddp": True})
r = smp.rank()
assert smp.size() == 4 and smp.rdp_size() == 2, (smp.size(), smp.rdp_size())
D = sys.argv[1]
pp, tp, rdp = smp.pp_rank(), smp.tp_rank(), smp.rdp_rank()


def same(a, b, path="<root>"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} {b.dtype}{b.shape}"
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b.view(torch.uint8) if b.dtype == torch.bool else b) or \
            a.contiguous().view(-1).view(torch.uint8).tolist() == b.contiguous().view(-1).view(torch.uint8).tolist(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}/{k}")
        assert getattr(a, "__dict__", {}).keys() == getattr(b, "__dict__", {}).keys(), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def state(p, t, d, version):
    base = 1000 * version + 100 * p + 10 * t + d
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6) + base
    sd = collections.OrderedDict([("layer.weight", w), ("layer.bias", torch.arange(6.0) - base),
                                  ("tied", w)])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "model": sd,
        "dtypes": {str(dt): (torch.arange(7) + base % 100).to(dt) for dt in (
            torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
            torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(version)),
                                    "exp_avg": torch.full((3,), 0.5 + base)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                        "amsgrad": False, "foreach": None, "params": [0]}]},
        7: "int key", (1, "a"): "tuple key", "bytes": b"\x00\xff", "nan": math.nan,
        "big": 2 ** 62, "neg": -5, "none": None, "strided": w.t(), "scalar": torch.tensor(3.5),
    }


def check_torch_load(path, expect):
    """Stock torch.load(weights_only=True) gives back exactly what was saved."""
    same(torch.load(path, weights_only=True), expect, path)


def expect_error(fn, *needles, cls=smp.CheckpointError):
    try:
        fn()
    except cls as e:
        text = str(e)
        for n in needles:
            assert n in text, f"{n!r} not in: {text}"
        return text
    raise AssertionError(f"no {cls.__name__} (expected {needles})")


# ---- 1. partial (v2) round trip; replicas skip; stock torch.load reads every file --
f = os.path.join(D, "ckpt.pt")
st = smp.save(state(pp, tp, 0, 1), f, partial=True)
assert st["skipped"] == (rdp != 0), st
smp.barrier()
same(smp.load(f, partial=True), state(pp, tp, 0, 1))
same(smp.load(os.path.join(D, "ckpt"), partial=True), state(pp, tp, 0, 1))  # without ".pt"
check_torch_load(f"{f}_{pp}_{tp}", state(pp, tp, 0, 1))
ls = smp.checkpoint.last_load_stats
assert ls["bytes"] > 0 and ls["gbps"] >= 0 and ls["smp_index"], ls
for k in ("open_seconds", "read_seconds", "deserialize_seconds"):
    assert k in ls, ls

# map_location: a callable and "cpu"
loaded = smp.load(f, map_location=lambda s, loc: s)
same(loaded, state(pp, tp, 0, 1))
assert smp.load(f, map_location="cpu")["model"]["layer.weight"].device.type == "cpu"
t = smp.load(f)["model"]
assert t["tied"] is t["layer.weight"], "tied tensors stay tied"

# ---- 2. v3: every rank; full save on the caller ----------------------------------
f3 = os.path.join(D, "opt")
smp.save(state(pp, tp, rdp, 2), f3, partial=True, v3=True)
same(smp.load(f3), state(pp, tp, rdp, 2))
check_torch_load(f"{f3}_{pp}_{tp}_{rdp}", state(pp, tp, rdp, 2))
if r == 0:
    full = os.path.join(D, "full.pt")
    smp.save(state(9, 9, 9, 9), full, partial=False)
    same(smp.load(full, partial=False), state(9, 9, 9, 9))
    check_torch_load(full, state(9, 9, 9, 9))
smp.barrier()

# ---- 3. files written by plain torch.save under smp's names ----------------------
# (given f, file name, rdp in the content: per-rank files carry this rank's rdp)
names = [("tsa.pt", f"tsa.pt_{pp}_{tp}", 0), ("tsb", f"tsb_{pp}_{tp}.pt", 0),
         ("tsc", f"tsc_{pp}_{tp}_{rdp}", rdp), ("tsd.pt", f"tsd_{pp}_{tp}.pt", 0),
         ("tse.pt", f"tse_{pp}_{tp}_{rdp}.pt", rdp)]
for given, written, d in names:
    if d == rdp:
        torch.save(state(pp, tp, d, 4), os.path.join(D, written))
smp.barrier()
for given, written, d in names:
    same(smp.load(os.path.join(D, given)), state(pp, tp, d, 4))
smp.barrier()

# ---- 4. objects smp's format does not hold: torch.save fallback, same protocol ----
class UserThing:
    def __init__(self, v):
        self.v = v


logging.basicConfig(level=logging.WARNING)
fb = os.path.join(D, "fallback")
smp.save({"size": torch.Size([2, 3]), "dtype": torch.float16}, fb, partial=True)
smp.barrier()
assert os.path.exists(fb + ".smp_manifest.json")
got = smp.load(fb)  # torch.load(weights_only=True) allows torch.Size and dtypes
assert got == {"size": torch.Size([2, 3]), "dtype": torch.float16}, got
fu = os.path.join(D, "user")
smp.save({"thing": UserThing(5)}, fu, partial=True)
smp.barrier()
expect_error(lambda: smp.load(fu), "refused", "weights_only=False")
assert smp.load(fu, weights_only=False)["thing"].v == 5
# The error says both ways out: torch's allow-list and the no-edit switch.
expect_error(lambda: smp.load(fu), "UserThing", "add_safe_globals", "SMP_UNSAFE_LOAD=1")
# torch's own allow-list is honoured, as a context manager and globally.
with torch.serialization.safe_globals([UserThing]):
    assert smp.load(fu)["thing"].v == 5
expect_error(lambda: smp.load(fu), "refused")  # the context ended
# SMP_UNSAFE_LOAD=1: an unchanged v1 script's smp.load(f) unpickles fully;
# an explicit weights_only=True still wins.
os.environ["SMP_UNSAFE_LOAD"] = "1"
assert smp.load(fu)["thing"].v == 5
expect_error(lambda: smp.load(fu, weights_only=True), "refused")
del os.environ["SMP_UNSAFE_LOAD"]
# numpy scalars and arrays (and a plain dict like vars(args)) load safely.
fn = os.path.join(D, "numpy")
smp.save({"w": torch.ones(3), "loss": np.float64(0.25), "steps": np.int64(7),
          "hist": np.arange(4, dtype=np.float32), "args": {"lr": 0.1, "name": "x"}},
         fn, partial=True)
smp.barrier()
got = smp.load(fn)
assert isinstance(got["loss"], np.float64) and got["loss"] == 0.25, got
assert got["steps"] == 7 and np.array_equal(got["hist"], np.arange(4, dtype=np.float32)), got
assert got["args"] == {"lr": 0.1, "name": "x"} and torch.equal(got["w"], torch.ones(3)), got

# ---- 5. a malicious pickle is refused; the marker is never created ---------------
marker = os.path.join(D, f"pwned_{r}")


class Evil:
    def __reduce__(self):
        return (open, (marker, "w"))


evil = os.path.join(D, f"evil_{r}.pt")
torch.save({"x": torch.ones(2), "evil": Evil()}, evil)
text = expect_error(lambda: smp.load(evil, partial=False), evil, "weights_only=False")
assert not os.path.exists(marker), "code from the file ran"
smp.load(evil, partial=False, weights_only=False)  # the opt-in runs it
assert os.path.exists(marker)

# ---- 6. unreadable path, incomplete and mixed checkpoints -------------------------
expect_error(lambda: smp.load(os.path.join(D, "missing.pt"), partial=False),
             "No such file or directory")
expect_error(lambda: smp.load(os.path.join(D, "nothing")), "has no part for rank",
             "tried")
smp.barrier()
if r == 0:
    os.rename(f3 + ".smp_manifest.json", os.path.join(D, "saved_manifest"))
smp.barrier()
expect_error(lambda: smp.load(f3), "incomplete checkpoint (no manifest; a save was interrupted)")
smp.barrier()
g = os.path.join(D, "other")
smp.save(state(pp, tp, rdp, 5), g, partial=True, v3=True)
if r == 0:
    os.rename(os.path.join(D, "saved_manifest"), f3 + ".smp_manifest.json")
    os.replace(f"{g}_0_0_0", f"{f3}_0_0_0")
smp.barrier()
if (pp, tp, rdp) == (0, 0, 0):
    expect_error(lambda: smp.load(f3), "mixed checkpoint", f"{f3}_0_0_0", "names save id")
else:
    same(smp.load(f3), state(pp, tp, rdp, 2))
smp.barrier()

# ---- 7. the wrong rank condition fails within SMP_CHECKPOINT_TIMEOUT --------------
os.environ["SMP_CHECKPOINT_TIMEOUT"] = "3"
wf = os.path.join(D, "wrong")
if smp.dp_rank() == 0:
    expect_error(lambda: smp.save({"x": torch.ones(1)}, wf, partial=True),
                 "timed out after 3 s", "never called smp.save",
                 "must be called by every rank with rdp_rank()==0 (not dp_rank()==0)")
del os.environ["SMP_CHECKPOINT_TIMEOUT"]
smp.barrier()
assert not glob.glob(wf + "*"), glob.glob(wf + "*")


# ---- 8. save_checkpoint / resume_from_checkpoint with stand-ins --------------------
class Model:
    def __init__(self, v):
        self.sd = collections.OrderedDict(w=torch.full((2, 2), float(v + 10 * tp)))
        self.loaded = None

    def local_state_dict(self):
        return dict(self.sd, _smp_is_partial=True)

    def state_dict(self, gather_to_rank0=True):
        return collections.OrderedDict(w_full=torch.full((2, 4), float(self.sd["w"][0, 0] - 10 * tp)))

    def load_state_dict(self, sd, strict=True, same_partition_load=False):
        self.loaded = (sd, strict, same_partition_load)


class Opt:
    def __init__(self, v):
        self.v = v
        self.loaded = None

    def local_state_dict(self):
        return {"state": {0: {"exp_avg": torch.full((2,), float(self.v + tp))}},
                "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}

    def state_dict(self):
        # what a full, unsharded optimizer state is: a real torch.optim.Adam's
        p = torch.nn.Parameter(torch.full((4,), float(self.v)))
        adam = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.99))
        p.grad = torch.ones(4)
        adam.step()
        return adam.state_dict()

    def load_state_dict(self, sd):
        self.loaded = sd


ck = os.path.join(D, "run")
for step in (1, 2, 3):
    smp.save_checkpoint(ck, f"step{step}", partial=True, model=Model(step), optimizer=Opt(step),
                        user_content={"step": step}, num_kept_partial_checkpoints=2)
    assert os.path.isfile(os.path.join(ck, f"step{step}_partial", f"model_{pp}_{tp}.pt"))
    assert os.path.isfile(os.path.join(ck, f"step{step}_partial", f"optimizer_states_{pp}_{tp}.pt"))
smp.barrier()
assert sorted(os.listdir(ck)) == ["newest", "step2_partial", "step3_partial"], os.listdir(ck)
assert open(os.path.join(ck, "newest")).read() == "step2_partial\nstep3_partial\n"
for name in os.listdir(os.path.join(ck, "step3_partial")):
    if name.endswith(".pt"):
        torch.load(os.path.join(ck, "step3_partial", name), weights_only=True)
m, o = Model(0), Opt(0)
uc = smp.resume_from_checkpoint(ck, model=m, optimizer=o)
assert uc == {"step": 3}, uc
same(m.loaded[0], Model(3).local_state_dict())
assert m.loaded[1:] == (True, True), m.loaded
same(o.loaded, Opt(3).local_state_dict())
uc = smp.resume_from_checkpoint(ck, tag="step2", model=m, optimizer=o, load_optimizer=False)
assert uc == {"step": 2}
same(o.loaded, Opt(3).local_state_dict())  # not reloaded

# full checkpoint: model on rank 0, a full unsharded optimizer state a plain torch
# optimizer loads
smp.save_checkpoint(ck, "final", partial=False, model=Model(7), optimizer=Opt(7),
                    user_content={"done": True})
assert os.path.isfile(os.path.join(ck, "final")) and os.path.isfile(os.path.join(ck, "optimizer_final"))
same(torch.load(os.path.join(ck, "final"), weights_only=True), Model(7).state_dict())
p = torch.nn.Parameter(torch.zeros(4))
plain = torch.optim.Adam([p], lr=0.5)
plain.load_state_dict(torch.load(os.path.join(ck, "optimizer_final"), weights_only=True))
assert plain.param_groups[0]["lr"] == 0.1 and plain.param_groups[0]["betas"] == (0.9, 0.99)
assert torch.equal(plain.state[p]["exp_avg"], Opt(7).state_dict()["state"][0]["exp_avg"])
uc = smp.resume_from_checkpoint(ck, tag="final", partial=False, model=m, optimizer=o)
assert uc == {"done": True}
same(m.loaded[0], Model(7).state_dict())
same(o.loaded, Opt(7).state_dict())

# the tag must agree on every rank
expect_error(lambda: smp.save_checkpoint(ck, f"t{r % 2}", model=Model(1)),
             "the tag must be the same on every rank", "ranks [0, 2]: 't0'")
smp.barrier()
print(f"ckpt_engine OK {r}", flush=True)
