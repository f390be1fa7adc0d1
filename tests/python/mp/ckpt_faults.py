"""Crash and I/O-fault runs of the checkpoint saves (tests/python/test_checkpoint_faults.py).

    ckpt_faults.py setup  ROOT            writes version 1 of every case into ROOT/<case>
    ckpt_faults.py fault  DIR CASE        saves version 2 of CASE into DIR; the rank named by
                                          SMP_TEST_FAULT_RANK gets SMP_FAULT_POINT =
                                          SMP_TEST_FAULT (set before smp loads)
    ckpt_faults.py verify ROOT CASE...    each ROOT/<case-dir> loads version 1 or 2 exactly and
                                          the same on every rank; a clean save of version 3
                                          then leaves no temporary behind
Run under mpirun with 2 processes (tensor_parallel_degree 2)."""

import os
import sys

if os.environ.get("SMP_TEST_FAULT") and \
        os.environ.get("OMPI_COMM_WORLD_RANK") == os.environ.get("SMP_TEST_FAULT_RANK"):
    os.environ["SMP_FAULT_POINT"] = os.environ["SMP_TEST_FAULT"]

import torch  # noqa: E402

import smp  # noqa: E402

CASES = ("partial", "full", "async", "ckpt", "ckpt_async")


def tensor(version, tp, i):
    return torch.arange(20000, dtype=torch.float32) + version * 1e6 + tp * 1e4 + i


def obj(version, kind="obj"):
    tp = smp.tp_rank()
    return {"kind": kind, "v": version, "a": tensor(version, tp, 0),
            "b": {"c": tensor(version, tp, 1), "d": [tensor(version, tp, 2), 7]}}


class Stub:
    """What save_checkpoint / resume_from_checkpoint need of a model or optimizer."""

    def __init__(self, version, kind):
        self.sd = obj(version, kind) if version else None
        self.loaded = None

    def local_state_dict(self):
        return self.sd

    def load_state_dict(self, sd, *args, **kwargs):
        self.loaded = sd


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def save(case, d, version):
    if case == "partial":
        smp.save(obj(version), os.path.join(d, "ckpt.pt"), partial=True)
    elif case == "full":
        try:
            if smp.rank() == 0:
                smp.save(obj(version), os.path.join(d, "full.pt"), partial=False)
        finally:
            smp.barrier()
        return
    elif case == "async":
        smp.save(obj(version), os.path.join(d, "async.pt"), partial=True, async_save=True).wait()
    elif case in ("ckpt", "ckpt_async"):
        h = smp.save_checkpoint(d, "t", partial=True, model=Stub(version, "model"),
                                optimizer=Stub(version, "opt"), user_content={"v": version},
                                async_save=case == "ckpt_async")
        if h is not None:
            h.wait()
    else:
        raise ValueError(case)
    smp.barrier()


def load_version(case, d):
    """The version this rank loads from d (checked exact), or raises."""
    if case in ("partial", "full", "async"):
        name = {"partial": "ckpt.pt", "full": "full.pt", "async": "async.pt"}[case]
        got = smp.load(os.path.join(d, name), partial=case != "full")
        if case == "full":  # rank 0's tensors
            want = {"kind": "obj", "v": got["v"], "a": tensor(got["v"], 0, 0),
                    "b": {"c": tensor(got["v"], 0, 1), "d": [tensor(got["v"], 0, 2), 7]}}
        else:
            want = obj(got["v"])
        assert same(got, want), f"{d}: rank {smp.rank()} loaded wrong data for version {got['v']}"
        return got["v"]
    model, opt = Stub(0, "model"), Stub(0, "opt")
    uc = smp.resume_from_checkpoint(d, model=model, optimizer=opt)
    v = uc["v"]
    assert same(model.loaded, obj(v, "model")), f"{d}: model is not version {v}"
    assert same(opt.loaded, obj(v, "opt")), f"{d}: optimizer is not version {v}"
    with open(os.path.join(d, "newest")) as fd:
        assert fd.read().split() == ["t_partial"], d
    return v


def temporaries(d):
    out = []
    for root, dirs, files in os.walk(d):
        out += [os.path.join(root, n) for n in dirs + files if ".tmp-" in n or "smp_lock" in n]
    return sorted(out)


def main():
    mode = sys.argv[1]
    smp.init({"tensor_parallel_degree": 2, "ddp": True})
    if mode == "setup":
        for case in CASES:
            d = os.path.join(sys.argv[2], case)
            if smp.rank() == 0:
                os.makedirs(d, exist_ok=True)
            smp.barrier()
            save(case, d, 1)
    elif mode == "fault":
        save(sys.argv[3], sys.argv[2], 2)
        print(f"FAULT NOT HIT {smp.rank()}", flush=True)
    elif mode == "ioerror":
        d, case = sys.argv[2], sys.argv[3]
        try:
            save(case, d, 2)
            print(f"NO ERROR rank {smp.rank()}", flush=True)
        except smp.CheckpointError as e:
            print(f"IOERROR rank {smp.rank()}: {' '.join(str(e).split())}", flush=True)
        smp.barrier()
        left = temporaries(d)
        assert not left, f"{d}: temporaries left after the failed save: {left}"
        assert load_version(case, d) == 1, d
    elif mode == "verify":
        root = sys.argv[2]
        for item in sys.argv[3:]:
            name, case = item.split("=")
            d = os.path.join(root, name)
            v = load_version(case, d)
            vs = smp.allgather(v, smp.CommGroup.WORLD)
            assert len(set(vs)) == 1, f"{d}: ranks loaded different versions {vs}"
            smp.barrier()
            save(case, d, 3)  # the next save cleans what the interrupted one left
            left = temporaries(d)
            assert not left, f"{d}: temporaries left after the next save: {left}"
            assert load_version(case, d) == 3, d
            smp.barrier()
            print(f"VERIFIED {name} {case} old={vs[0]} rank {smp.rank()}", flush=True)
    smp.barrier()
    print(f"faults {mode} OK {smp.rank()}", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
