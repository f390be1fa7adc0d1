"""Full-checkpoint memory benchmark (not a test): rank 0's peak host memory
while writing the full model (issue 16), and the offline consolidation's.

    python tests/bench/full_save_bench.py          # launches mpirun -np 2 (tp 2) itself

In one job on tp 2: (a) smp.save(model.state_dict(gather_to_rank0=True), f,
partial=False), the whole model on rank 0; (b) smp.checkpoint.save_full_streaming,
tensor by tensor; then, in a fresh process, (c) smp-checkpoint consolidate of the
partial checkpoint the job also saved. Prints each one's peak RSS growth on rank
0 (sampled every 2 ms) next to the largest tensor and the model size.

Environment: SMP_BENCH_LAYERS (Linear layers, default 8), SMP_BENCH_WIDTH
(square layer width, default 2048: 16 MiB per float32 weight), SMP_BENCH_DIR.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _rss():
    with open("/proc/self/statm") as fd:
        return int(fd.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS growth over the value at start, sampled every 2 ms."""

    def __init__(self):
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base


def mib(n):
    return f"{n / 2**20:.1f} MiB"


def job(d):
    import torch
    import smp
    layers = int(os.environ.get("SMP_BENCH_LAYERS", "8"))
    width = int(os.environ.get("SMP_BENCH_WIDTH", "2048"))
    smp.init({"tensor_parallel_degree": 2, "ddp": True})
    mods = []
    for _ in range(layers):
        lin = torch.nn.Linear(width, width, bias=False)
        smp.set_tensor_parallelism(lin)
        mods.append(lin)
    model = smp.DistributedModel(torch.nn.Sequential(*mods))
    largest = width * width * 4
    total = layers * largest
    if smp.rdp_rank() == 0:
        smp.save(model.local_state_dict(), os.path.join(d, "partial.pt"), partial=True)
    smp.barrier()
    for name in ("plain", "streaming"):
        smp.barrier()
        peak = PeakRSS()
        t0 = time.perf_counter()
        if name == "plain":
            sd = model.state_dict(gather_to_rank0=True)
            if smp.rank() == 0:
                smp.save(sd, os.path.join(d, "plain.pt"), partial=False)
            del sd
        else:
            smp.checkpoint.save_full_streaming(model, os.path.join(d, "stream.pt"))
        secs = time.perf_counter() - t0
        grow = peak.stop()
        if smp.rank() == 0:
            print(f"{name:>10} full save: rank 0 peak RSS growth {mib(grow)} "
                  f"({grow / largest:.2f}x the largest tensor {mib(largest)}; model "
                  f"{mib(total)}) in {secs:.2f} s", flush=True)
    smp.shutdown()


def consolidate(d):
    from smp.checkpoint import tools
    peak = PeakRSS()
    s = tools.consolidate(os.path.join(d, "partial.pt"), os.path.join(d, "consolidated.pt"))
    grow = peak.stop()
    print(f"consolidate: peak RSS growth {mib(grow)} ({grow / s['largest_tensor']:.2f}x the "
          f"largest tensor {mib(s['largest_tensor'])}; file {mib(s['bytes'])}) in "
          f"{s['seconds']:.2f} s", flush=True)


def main():
    if len(sys.argv) > 2:
        {"job": job, "consolidate": consolidate}[sys.argv[1]](sys.argv[2])
        return
    d = os.environ.get("SMP_BENCH_DIR") or tempfile.mkdtemp(prefix="smp-fullsave-")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"), OMP_NUM_THREADS="1")
    mpi = ["mpirun", "-np", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        mpi.append("--allow-run-as-root")
    subprocess.run(mpi + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable,
                          __file__, "job", d], env=env, check=True, timeout=900)
    subprocess.run([sys.executable, __file__, "consolidate", d], env=env, check=True,
                   timeout=900)


if __name__ == "__main__":
    main()
