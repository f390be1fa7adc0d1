"""Resharding benchmark (not a test): a partial checkpoint saved on pp2 x tp2 is
loaded on pp2 x tp2 (same layout), pp1 x tp4 and pp1 x tp1 (x rdp4), in the same
run; prints each load's time (slowest rank), the ratio to the same-layout load,
and each rank's peak host memory growth during the load (RSS sampled every 2 ms).

    python tests/bench/reshard_bench.py               # launches the mpirun jobs itself
    SMP_BENCH_GB=0.5 SMP_BENCH_DEVICE=cuda python tests/bench/reshard_bench.py

Environment: SMP_BENCH_GB (model parameters in GB, whole model, default 0.25; the
checkpoint holds them plus Adam's two moments), SMP_BENCH_DIR (default: a new
temp dir), SMP_BENCH_DEVICE (cuda when available, else cpu; with fewer GPUs than
the 4 ranks, run on cpu and say so), SMP_BENCH_NP (ranks, default 4). The pp1 x tp1 load runs twice: cooperative
(the default: each byte read once per rdp replica group, then broadcast) and
with SMP_RESHARD_COOPERATIVE=0 (each replica reads everything), for comparison.
Internally: reshard_bench.py <save|load> <dir> <pp> <tp> under mpirun.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _rss_bytes():
    with open("/proc/self/statm") as fd:
        return int(fd.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def worker(mode, d, pp, tp):
    import torch

    import smp

    device_type = os.environ.get("SMP_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    gb = float(os.environ.get("SMP_BENCH_GB", "0.25"))
    smp.init({"pipeline_parallel_degree": pp, "tensor_parallel_degree": tp, "ddp": True,
              "microbatches": 1})
    if device_type == "cuda":
        torch.cuda.set_device(smp.local_rank())
    layers = 8
    hidden = int((gb * 1e9 / 4 / layers) ** 0.5)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    smp.set_tensor_parallelism(net)
    model = smp.DistributedModel(net)
    if device_type == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    f = os.path.join(d, "ckpt.pt")
    if mode == "save":
        for p in model.local_parameters():  # Adam state without a training step
            p.grad = torch.ones_like(p)
        optimizer.orig_step()
        if smp.rdp_rank() == 0:
            smp.save({"model_state_dict": model.local_state_dict(),
                      "optimizer_state_dict": optimizer.local_state_dict()}, f, partial=True)
        smp.barrier()
    else:
        import gc

        gc.collect()
        smp.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            ckpt = smp.load(f, partial=True)
            model.load_state_dict(ckpt["model_state_dict"], same_partition_load=False)
            optimizer.load_state_dict(ckpt["optimizer_state_dict"])
            seconds = time.perf_counter() - t0
        local = sum(t.numel() * t.element_size() for t in model.local_parameters()) * 3
        stats = smp.checkpoint.last_load_stats or {}
        read = stats.get("read_bytes", local) if "resharded_from" in stats else local
        phases = {k: stats.get(k, 0.0) for k in ("plan_seconds", "read_seconds")}
        phases["broadcast_seconds"] = stats.get("cooperative", {}).get("broadcast_seconds", 0.0)
        rows = smp.allgather({"seconds": seconds, "peak_growth": mem.peak - mem.base,
                              "state_bytes": local, "read_bytes": read, **phases}, smp.WORLD)
        if smp.rank() == 0:
            print("RESULT " + json.dumps({
                "layout": f"pp{pp} x tp{tp} x rdp{smp.rdp_size()}"
                          + ("" if os.environ.get("SMP_RESHARD_COOPERATIVE", "1") != "0"
                             else " indep"), "device": device_type,
                "read_bytes_max": max(r["read_bytes"] for r in rows),
                **{k: max(r[k] for r in rows)
                   for k in ("plan_seconds", "read_seconds", "broadcast_seconds")},
                "seconds": max(r["seconds"] for r in rows),
                "peak_growth_max": max(r["peak_growth"] for r in rows),
                "state_bytes_max": max(r["state_bytes"] for r in rows)}), flush=True)
    smp.shutdown()


def mpirun(np, *args, cooperative=True):
    cmd = ["mpirun", "-np", str(np), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = dict(os.environ)
    env["SMP_RESHARD_COOPERATIVE"] = "1" if cooperative else "0"
    env["PYTHONPATH"] = os.path.join(REPO, "python") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd += ["-x", "PYTHONPATH", "-x", "SMP_RESHARD_COOPERATIVE", sys.executable, os.path.abspath(__file__), *map(str, args)]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-5000:]}")
    return [json.loads(ln[len("RESULT "):]) for ln in out.stdout.splitlines()
            if ln.startswith("RESULT ")]


def main():
    np = int(os.environ.get("SMP_BENCH_NP", "4"))
    d = os.environ.get("SMP_BENCH_DIR") or tempfile.mkdtemp(prefix="smp-reshard-bench-")
    os.makedirs(d, exist_ok=True)
    try:
        mpirun(np, "save", d, 2, 2)
        rows = []
        for pp, tp, coop in ((2, 2, True), (1, 4, True), (1, 1, True), (1, 1, False),
                             (2, 2, True)):
            rows += mpirun(np, "load", d, pp, tp, cooperative=coop)
        base = min(r["seconds"] for r in rows if r["layout"].startswith("pp2 x tp2"))
        print(f"{'layout':<28}{'device':<8}{'load s':>10}{'ratio':>8}{'peak MB':>10}"
              f"{'state MB':>10}{'read MB':>10}{'MB/s':>10}")
        for r in rows:
            print(f"{r['layout']:<28}{r['device']:<8}{r['seconds']:>10.3f}"
                  f"{r['seconds'] / base:>8.2f}{r['peak_growth_max'] / 1e6:>10.1f}"
                  f"{r['state_bytes_max'] / 1e6:>10.1f}{r['read_bytes_max'] / 1e6:>10.1f}"
                  f"{r['state_bytes_max'] / 1e6 / r['seconds']:>10.1f}")
        print("phases of the resharded loads (slowest rank each): "
              + "; ".join(f"{r['layout']}: plan {r['plan_seconds']:.3f} s, read "
                          f"{r['read_seconds']:.3f} s, broadcast {r['broadcast_seconds']:.3f} s"
                          for r in rows if not r["layout"].startswith("pp2 x tp2")))
        print("(the same-layout rows are pp2 x tp2; ratio = load time / best same-layout time; "
              "peak MB = largest per-rank RSS growth during smp.load + load_state_dict; state MB = "
              "largest per-rank parameters + Adam moments; read MB = largest per-rank bytes read "
              "from the files (state MB on the same layout); 'indep' = "
              "SMP_RESHARD_COOPERATIVE=0, every rdp replica reads everything itself; "
              "MB/s = state MB / load s)")
    finally:
        if not os.environ.get("SMP_BENCH_DIR"):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
