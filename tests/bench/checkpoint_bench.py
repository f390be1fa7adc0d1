"""Checkpoint benchmark (not a test): smp.save / smp.load (partial) against
per-rank torch.save / torch.load of the same state, on the same disk, each
followed by fsync so that the numbers are durable ones, and against the disk's
own ceilings measured in the same run: the same bytes written with pwrite from
SMP_BENCH_THREADS threads (fsync'd) and read back with pread (page cache
dropped with posix_fadvise where the kernel honours it). Peak host memory
(VmHWM, reset before each operation) is reported per operation.

Also measured: the asynchronous smp.save (stall: until the call returns;
total: until the handle's wait() returns), loads straight onto the GPU
(map_location="cuda") when CUDA is available, a training loop that saves
asynchronously every SMP_BENCH_SAVE_EVERY steps (step time with and without),
and, when CUDA is available and shared/bench/peer_dcp.py is present, PyTorch
DCP on the same machine (run by rank 0 after smp shut down, with torchrun).

    mpirun -np 2 python tests/bench/checkpoint_bench.py            # 1 GB per rank
    SMP_BENCH_GB=0.25 SMP_BENCH_DIR=/tmp/b mpirun -np 2 python tests/bench/checkpoint_bench.py
    torchrun --nproc_per_node 8 tests/bench/checkpoint_bench.py

Environment: SMP_BENCH_GB (GB per rank, default 1), SMP_BENCH_DIR (default: a new
directory under the system temp dir; use the disk you checkpoint to),
SMP_BENCH_REPEAT (default 2: the best of N is reported), SMP_BENCH_DEVICE
(cuda when available, else cpu), SMP_BENCH_THREADS (threads of the raw
ceilings, default min(8, CPUs per rank)), SMP_BENCH_SAVE_EVERY (default 10),
SMP_BENCH_STEPS (training steps per phase, default 30), SMP_BENCH_DCP (0: skip
the DCP peer). Rank 0 prints a table; times are the slowest rank's (what a
collective checkpoint costs).
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

import smp


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_state(gb, device):
    """A model/optimizer-like state: many tensors of mixed sizes and dtypes."""
    total = int(gb * 1e9)
    state, used, i = {}, 0, 0
    sizes = [64 << 20, 16 << 20, 4 << 20, 1 << 20, 256 << 10]
    while used < total:
        nbytes = min(sizes[i % len(sizes)], total - used)
        dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
        n = max(1, nbytes // torch.empty(0, dtype=dtype).element_size())
        state[f"layer{i}.weight"] = torch.randn(n, device=device).to(dtype)
        used += n * state[f"layer{i}.weight"].element_size()
        i += 1
    return {"model": state, "step": 1, "meta": {"gb": gb}}, used


def reset_peak_rss():
    """Resets VmHWM (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def raw_chunks(nbytes, threads, chunk=64 << 20):
    """[(offset, length)] of nbytes in chunks, dealt round-robin to threads."""
    out = [[] for _ in range(threads)]
    off, i = 0, 0
    while off < nbytes:
        n = min(chunk, nbytes - off)
        out[i % threads].append((off, n))
        off += n
        i += 1
    return out


def _parallel_io(path, buf, threads, flags, io):
    """Moves buf's bytes to or from path in chunks from `threads` threads;
    io(fd, view, offset) -> bytes moved (os.pwrite / os.preadv release the
    GIL). The first error of any thread is raised here."""
    fd = os.open(path, flags, 0o644)
    mv = memoryview(buf)
    errors = []

    def work(chunks):
        try:
            for off, n in chunks:
                done = 0
                while done < n:
                    got = io(fd, mv[off + done:off + n], off + done)
                    if got <= 0:
                        raise OSError(f"no progress on {path} at byte {off + done}")
                    done += got
        except OSError as e:
            errors.append(e)

    try:
        ts = [threading.Thread(target=work, args=(c,)) for c in raw_chunks(len(buf), threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        if flags & os.O_WRONLY:
            os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(path, buf, threads):
    """The write ceiling: buf's bytes to path with pwrite, then one fsync."""
    _parallel_io(path, buf, threads, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.pwrite)


def raw_read(path, buf, threads):
    """The read ceiling: path's bytes into buf with preadv."""
    _parallel_io(path, buf, threads, os.O_RDONLY,
                 lambda fd, view, off: os.preadv(fd, [view], off))


def slowest(seconds):
    return max(smp.allgather(seconds, smp.WORLD))


PEAKS = {}
PROFILES = {}  # operation -> rank 0's stats of its last run (phases and profile)


def print_profiles():
    """Rank 0's phases of the last run of each smp operation, and where the
    time went inside them (the engine's profile: seconds of the calling
    thread, or summed over the I/O threads where the key says so)."""
    for name, st in PROFILES.items():
        if not st:
            continue
        if "write_seconds" in st:
            phases = ["serialize", "write", "fsync", "rendezvous", "commit"]
        else:
            phases = ["open", "read", "deserialize"]
        text = ", ".join(f"{p} {st[p + '_seconds']:.3f} s" for p in phases)
        print(f"# rank 0 phases, last {name}: {text}")
        prof = st.get("profile") or {}
        threads = int(prof.get("threads", 0))
        summed = {"pwrite", "crc32", "writeback", "idle", "pread", "h2d_copy", "slot_wait"}
        parts = []
        for k, v in sorted(prof.items()):
            if k == "threads":
                continue
            if k in summed and threads and (k != "slot_wait" or "write_seconds" not in st):
                parts.append(f"{k} {v:.3f} thread-s")
            else:
                parts.append(f"{k} {v:.3f} s")
        if parts:
            print(f"#   profile ({threads} I/O threads): " + ", ".join(parts))


def timed(fn, name=None):
    smp.barrier()
    measured = reset_peak_rss()
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    fn()
    dt = slowest(time.perf_counter() - t0)
    if name and measured:
        PEAKS[name] = max(PEAKS.get(name, 0), max(smp.allgather(peak_rss_bytes() - base, smp.WORLD)))
    return dt


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def training_loop(device, param_gb, steps, save_every, path):
    """Mean step time of an MLP with Adam (params ~ param_gb, so model + optimizer
    state ~ 3 x param_gb) without and with an asynchronous smp.save every
    `save_every` steps; also the steps that saved (their stall included)."""
    width = 2048
    layers = max(2, int(param_gb * 1e9 / (width * width * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(16, width, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    for _ in range(3):  # warm-up; creates Adam's state
        step()
    sync(device)
    out = {"layers": layers, "state_gb": sum(p.numel() * 4 for p in model.parameters()) * 3 / 1e9}
    for label, saving in (("without", False), ("with", True)):
        times, save_steps, stalls = [], [], []
        smp.barrier()
        t_all = time.perf_counter()
        for i in range(steps):
            t0 = time.perf_counter()
            step()
            if saving and (i + 1) % save_every == 0:
                ts = time.perf_counter()
                smp.save({"model": model.state_dict(), "optim": opt.state_dict()}, path,
                         partial=True, v3=True, async_save=True)
                stalls.append(time.perf_counter() - ts)
            sync(device)
            dt = time.perf_counter() - t0
            times.append(dt)
            if saving and (i + 1) % save_every == 0:
                save_steps.append(dt)
        tw = time.perf_counter()
        smp.wait_for_pending_saves()
        out[label] = {
            "mean_step": slowest(sum(times) / len(times)),
            "max_step": slowest(max(times)),
            "stall": slowest(max(stalls)) if stalls else 0.0,
            "final_wait": slowest(time.perf_counter() - tw),
            "loop": slowest(time.perf_counter() - t_all),
            "saves": len(stalls),
        }
    return out


def run_dcp_peer(gb, world, base):
    """shared/bench/peer_dcp.py under torchrun on the same disk; its JSON or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    peer = os.environ.get("SMP_BENCH_PEER",
                          os.path.join(here, "..", "..", "shared", "bench", "peer_dcp.py"))
    if not os.path.exists(peer) or os.environ.get("SMP_BENCH_DCP", "1") == "0":
        return None
    env = dict(os.environ, PB_GB_PER_RANK=str(gb * 1e9 / (1 << 30)),
               PB_DIR=os.path.join(base, "dcp_peer"))
    for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
        env.pop(k)  # not an MPI job
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), peer]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800).stdout
    except (subprocess.SubprocessError, OSError) as e:
        print(f"# DCP peer failed: {e}")
        return None
    start = out.find("{\n")
    try:
        return json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        print(f"# DCP peer printed no JSON:\n{out[-2000:]}")
        return None


def run():
    smp.init({"ddp": True})
    gb = float(os.environ.get("SMP_BENCH_GB", "1"))
    repeat = int(os.environ.get("SMP_BENCH_REPEAT", "2"))
    device = os.environ.get("SMP_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(smp.local_rank() % torch.cuda.device_count())
    base = os.environ.get("SMP_BENCH_DIR")
    made = base is None
    if smp.rank() == 0:
        if base is None:
            base = tempfile.mkdtemp(prefix="smp_ckpt_bench_")
        os.makedirs(base, exist_ok=True)
    base = smp.allgather(base, smp.WORLD)[0]

    state, nbytes = build_state(gb, device)
    if device == "cuda":
        torch.cuda.synchronize()
    r, pp, tp, rdp = smp.rank(), smp.pp_rank(), smp.tp_rank(), smp.rdp_rank()
    smp_f = os.path.join(base, "smp_ckpt")
    torch_f = os.path.join(base, f"torch_ckpt_{r}.pt")
    raw_f = os.path.join(base, f"raw_{r}.bin")
    names = ["raw write", "smp.save", "smp.save async", "torch.save",
             "raw read", "smp.load", "torch.load"]
    if device == "cuda":
        names += ["smp.load cuda", "torch.load cuda"]
    results = {k: [] for k in names}
    stalls = []
    local_ranks = max(1, smp.local_size())
    threads = int(os.environ.get("SMP_BENCH_THREADS",
                                 max(1, min(8, (os.cpu_count() or 2) // local_ranks))))
    raw_buf = bytearray(nbytes)  # the same number of bytes as the state, in host memory

    def torch_save():
        torch.save(state, torch_f)
        fsync_path(torch_f)

    def drop_cache(path):
        # Best effort: ask the kernel to forget the file's pages so that loads read the disk.
        try:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            pass

    for _ in range(repeat):
        # v3 so that every rank writes its own file, like the per-rank torch.save.
        results["raw write"].append(timed(lambda: raw_write(raw_f, raw_buf, threads)))
        results["smp.save"].append(timed(lambda: smp.save(state, smp_f, partial=True, v3=True),
                                         "smp.save"))
        PROFILES["smp.save"] = smp.checkpoint.last_save_stats
        handle = []

        def start_async():
            t0 = time.perf_counter()
            handle.append(smp.save(state, smp_f, partial=True, v3=True, async_save=True))
            stalls.append(slowest(time.perf_counter() - t0))
            handle[-1].wait()

        results["smp.save async"].append(timed(start_async, "smp.save async"))
        results["torch.save"].append(timed(torch_save, "torch.save"))
        drop_cache(raw_f)
        drop_cache(f"{smp_f}_{pp}_{tp}_{rdp}")
        drop_cache(torch_f)
        results["raw read"].append(timed(lambda: raw_read(raw_f, raw_buf, threads)))
        results["smp.load"].append(timed(lambda: smp.load(smp_f, partial=True), "smp.load"))
        PROFILES["smp.load"] = smp.checkpoint.last_load_stats
        results["torch.load"].append(
            timed(lambda: torch.load(torch_f, map_location="cpu", weights_only=True),
                  "torch.load"))
        if device == "cuda":
            drop_cache(f"{smp_f}_{pp}_{tp}_{rdp}")
            drop_cache(torch_f)
            results["smp.load cuda"].append(timed(
                lambda: (smp.load(smp_f, partial=True, map_location="cuda"), sync(device)),
                "smp.load cuda"))
            PROFILES["smp.load cuda"] = smp.checkpoint.last_load_stats
            results["torch.load cuda"].append(timed(
                lambda: (torch.load(torch_f, map_location="cuda", weights_only=True),
                         sync(device)), "torch.load cuda"))

    save_every = int(os.environ.get("SMP_BENCH_SAVE_EVERY", "10"))
    steps = int(os.environ.get("SMP_BENCH_STEPS", "30"))
    train = training_loop(device, gb / 3, steps, save_every, os.path.join(base, "train_ckpt"))

    loaded = smp.load(smp_f, partial=True)
    ok = all(torch.equal(loaded["model"][k], v.cpu()) for k, v in state["model"].items())
    ok = all(smp.allgather(ok, smp.WORLD))
    if r == 0:
        total = nbytes * smp.size()
        card = torch.cuda.get_device_name() if device == "cuda" else "none (CPU tensors)"
        print(f"# smp checkpoint benchmark: {smp.size()} ranks x {nbytes / 1e9:.3f} GB "
              f"({total / 1e9:.3f} GB total), best of {repeat}, fsync'd, slowest rank")
        print(f"# host {platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}, "
              f"python {platform.python_version()}, torch {torch.__version__}, smp "
              f"{smp.__version__}, device {device}, card {card}, dir {base}")
        print(f"# loaded state equals saved state on every rank: {ok}")
        print(f"# raw ceilings: pwrite/pread of the same bytes, {threads} threads per rank; "
              "the page cache is dropped with posix_fadvise(DONTNEED) before reads (best "
              "effort: a kernel may keep pages, then reads are cache speed)")
        print(f"{'operation':<15} {'seconds':>9} {'GB/s total':>11} {'GB/s per rank':>14} "
              f"{'x ceiling':>10} {'peak host MB':>13}")
        best = {name: min(times) for name, times in results.items()}
        for name in results:
            ceiling = best["raw write"] if "save" in name else (
                best["raw read"] if "load" in name else best[name])
            peak = PEAKS.get(name)
            print(f"{name:<15} {best[name]:9.3f} {total / best[name] / 1e9:11.2f} "
                  f"{nbytes / best[name] / 1e9:14.2f} {ceiling / best[name]:10.2f} "
                  f"{'-' if peak is None else f'{peak / 1e6:.0f}':>13}")
        print(f"# smp.save / torch.save speed: {best['torch.save'] / best['smp.save']:.2f}x; "
              f"smp.load / torch.load speed: {best['torch.load'] / best['smp.load']:.2f}x")
        stall = min(stalls)
        print(f"# async smp.save: stall {stall:.3f} s ({stall / (nbytes / 2e9):.3f} s per 2 GB "
              f"per rank), total {best['smp.save async']:.3f} s = "
              f"{best['smp.save async'] / best['smp.save']:.2f}x the sync smp.save")
        if device == "cuda":
            print(f"# smp.load onto the GPU / torch.load onto the GPU speed: "
                  f"{best['torch.load cuda'] / best['smp.load cuda']:.2f}x; x read ceiling "
                  f"{best['raw read'] / best['smp.load cuda']:.2f}")
        w, a = train["without"], train["with"]
        print(f"# training loop: {train['layers']} x Linear(2048, 2048) + Adam "
              f"({train['state_gb']:.3f} GB of state per rank), {steps} steps, async smp.save "
              f"every {save_every} steps ({a['saves']} saves)")
        print(f"#   mean step without saves {w['mean_step'] * 1e3:.1f} ms, with saves "
              f"{a['mean_step'] * 1e3:.1f} ms ({a['mean_step'] / w['mean_step']:.2f}x); slowest "
              f"step with a save {a['max_step'] * 1e3:.1f} ms (stall of the call "
              f"{a['stall'] * 1e3:.1f} ms); wait for the last save at the end "
              f"{a['final_wait']:.3f} s")
        print_profiles()
    smp.barrier()
    if os.path.exists(raw_f):
        os.unlink(raw_f)
    if r == 0 and made:
        shutil.rmtree(base, ignore_errors=True)
    world = smp.size()
    smp.shutdown()
    if r == 0 and device == "cuda":
        peer = run_dcp_peer(nbytes / 1e9, world, base if not made else tempfile.mkdtemp())
        if peer:
            res = peer["results"]
            print(f"# DCP peer (shared/bench/peer_dcp.py, {peer['world']} ranks x "
                  f"{peer['GB_per_rank']} GB): " + json.dumps(res))
            for name, ours in (("dcp_save_threads8", best["smp.save"]),
                               ("dcp_load_same_layout", best["smp.load cuda"])):
                if name in res:
                    theirs = res[name]["s"] * nbytes / (peer["GB_per_rank"] * 1e9)
                    print(f"#   {name}: {theirs:.3f} s scaled to this state; smp is "
                          f"{theirs / ours:.2f}x as fast")
            if "dcp_async_save" in res:
                print(f"#   dcp async_save stall {res['dcp_async_save']['stall_s']} s, total "
                      f"{res['dcp_async_save']['total_s']} s; smp async stall {min(stalls):.3f} s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    run()
