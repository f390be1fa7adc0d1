"""NCCL collectives on CUDA tensors over smp's groups, one GPU per rank.

Run under mpirun with 2 or more ranks on a node with as many GPUs:

    mpirun -np 4 python3 tests/python/gpu/mp/nccl_collectives.py

For each parallel layout that fits the world size (one smp.init/smp.shutdown
cycle each) it checks allreduce (sum, avg, max), allgather, reduce_scatter,
broadcast, send/recv and barrier over TP_GROUP, DP_GROUP, PP_GROUP and WORLD
with exact expected values derived from the groups' member world ranks, for
float32, bfloat16 and int64; a 64 MiB allreduce; and that a CPU tensor still
goes over the host communicator in the same process. Prints one line per check
group on rank 0, "nccl_collectives: OK" at the end, and exits non-zero on any
failure (on every rank).

NCCL_COLLECTIVES_DEVICE=cpu runs the same checks on CPU tensors (the host
communicator, no GPU needed), which validates the script itself;
NCCL_COLLECTIVES_LAYOUT=<i> runs only the i-th layout of the world size.
"""

import os
import sys
import time
import traceback

import torch

import smp

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
GROUPS = ("TP_GROUP", "DP_GROUP", "PP_GROUP", "RDP_GROUP", "WORLD")
# Rank types whose groups get a send/recv chain, and the group of each.
RANK_TYPES = (("PP_RANK", "PP_GROUP"), ("TP_RANK", "TP_GROUP"), ("WORLD_RANK", "WORLD"))
BANDWIDTH_BYTES = 64 << 20
DEVICE_TYPE = os.environ.get("NCCL_COLLECTIVES_DEVICE", "cuda")


def synchronize():
    if DEVICE_TYPE == "cuda":
        torch.cuda.synchronize()


def layouts(world):
    if world == 8:
        # Issue 6: the one grid in which every group kind has two members.
        return [
            {"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True},
            {"pipeline_parallel_degree": 4, "tensor_parallel_degree": 2, "ddp": True},
            {"tensor_parallel_degree": 4, "ddp": True},
            {"pipeline_parallel_degree": 8},
        ]
    if world == 4:
        return [
            {"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True},
            {"tensor_parallel_degree": 2, "ddp": True},
            {"pipeline_parallel_degree": 4},
        ]
    return [
        {"tensor_parallel_degree": world, "ddp": True},
        {"pipeline_parallel_degree": world},
    ]


def members_of(group):
    return {
        "TP_GROUP": smp.get_tp_group,
        "DP_GROUP": smp.get_dp_group,
        "PP_GROUP": smp.get_pp_group,
        "RDP_GROUP": smp.get_rdp_group,
        "MP_GROUP": smp.get_mp_group,
        "WORLD": lambda: list(range(smp.size())),
    }[group]()


def pattern(numel_or_shape, dtype, device, shift=0):
    """1..7 repeating (starting at shift % 7 + 1): small integers, exact in every
    tested dtype."""
    shape = (numel_or_shape,) if isinstance(numel_or_shape, int) else tuple(numel_or_shape)
    numel = 1
    for s in shape:
        numel *= s
    base = (torch.arange(numel, device=device) + shift) % 7 + 1
    return base.reshape(shape).to(dtype)


class Checker:
    """Collects failures; every rank keeps calling the same collectives."""

    def __init__(self):
        self.failures = []
        self.counts = {}
        self.is_root = False

    def expect(self, section, name, actual, expected, exact=True):
        self.counts[section] = self.counts.get(section, 0) + 1
        try:
            actual_cpu = actual.detach().cpu()
            expected_cpu = expected.detach().cpu().to(actual_cpu.dtype)
            if actual_cpu.shape != expected_cpu.shape:
                raise AssertionError(
                    f"shape {tuple(actual_cpu.shape)}, expected {tuple(expected_cpu.shape)}")
            if exact:
                ok = torch.equal(actual_cpu, expected_cpu)
            else:
                rtol = 1e-2 if actual_cpu.dtype == torch.bfloat16 else 1e-5
                ok = torch.allclose(actual_cpu.float(), expected_cpu.float(), rtol=rtol, atol=rtol)
            if not ok:
                diff = (actual_cpu.float() - expected_cpu.float()).abs()
                where = int(diff.flatten().argmax())
                raise AssertionError(
                    f"max |diff| {float(diff.max())} at flat index {where}: got "
                    f"{actual_cpu.flatten()[where].item()}, expected "
                    f"{expected_cpu.flatten()[where].item()}")
        except AssertionError as e:
            msg = f"[rank {smp.rank()}] FAIL {section}: {name}: {e}"
            print(msg, flush=True)
            self.failures.append(msg)

    def check(self, section, name, condition, detail=""):
        self.counts[section] = self.counts.get(section, 0) + 1
        if not condition:
            msg = f"[rank {smp.rank()}] FAIL {section}: {name} {detail}"
            print(msg, flush=True)
            self.failures.append(msg)


def agree_failures(checker):
    """Total failures over the world, through the host communicator."""
    t = torch.tensor([len(checker.failures)], dtype=torch.int64)
    smp.comm.allreduce(t, group=smp.CommGroup.WORLD, op=smp.ReduceOp.SUM)
    return int(t.item())


def report(checker, section, start, failures_before):
    total = agree_failures(checker)
    if smp.rank() == 0:
        status = "ok" if total == failures_before else f"FAILED ({total - failures_before})"
        print(f"nccl_collectives: {section}: {checker.counts.get(section, 0)} checks per rank, "
              f"{time.perf_counter() - start:.2f} s: {status}", flush=True)
    return total


def check_group(checker, section, group_name, device):
    group = getattr(smp.CommGroup, group_name)
    members = members_of(group_name)
    me = smp.rank()
    n = len(members)
    checker.check(section, f"{group_name} membership", me in members, f"{me} not in {members}")
    r = members.index(me)
    for dtype in DTYPES:
        tag = f"{group_name} {str(dtype).replace('torch.', '')}"
        shape = (3, 5)
        base = pattern(shape, dtype, device)
        # allreduce sum / max / avg, in place
        t = (me + 1) * base
        smp.comm.allreduce(t, group=group, op=smp.ReduceOp.SUM)
        checker.check(section, f"{tag} allreduce stays on {device}", t.device == device)
        checker.expect(section, f"{tag} allreduce sum", t, sum(m + 1 for m in members) * base)
        t = (me + 1) * base
        smp.comm.allreduce(t, group=group, op=smp.ReduceOp.MAX)
        checker.expect(section, f"{tag} allreduce max", t, (max(members) + 1) * base)
        if dtype.is_floating_point:
            t = (me + 1) * base
            smp.comm.allreduce(t, group=group, op=smp.ReduceOp.AVG)
            expected = base.float() * (sum(m + 1 for m in members) / n)
            checker.expect(section, f"{tag} allreduce avg", t, expected, exact=False)
        # allgather: [n, *shape], member j's tensor at [j]
        t = (me + 1) * base
        out = smp.comm.allgather(t, group)
        expected = torch.stack([(m + 1) * base for m in members])
        checker.expect(section, f"{tag} allgather", out, expected)
        # reduce_scatter: input [n*2, 5], block j = (world rank + 1) * pattern shifted by j.
        # Every partial sum stays <= 36 * 7 = 252 up to 8 members: exact in bfloat16.
        def block(j):
            return pattern((2, 5), dtype, device, shift=j)

        t = torch.cat([(me + 1) * block(j) for j in range(n)])
        out = smp.comm.reduce_scatter(t, group, smp.ReduceOp.SUM)
        expected = sum(m + 1 for m in members) * block(r)
        checker.expect(section, f"{tag} reduce_scatter", out, expected)
        # broadcast from the first and from the last group rank
        for root in sorted({0, n - 1}):
            t = (me + 1) * base
            smp.comm.broadcast(t, root, group)
            checker.expect(section, f"{tag} broadcast root {root}", t, (members[root] + 1) * base)
    smp.barrier(group)
    synchronize()


def check_send_recv(checker, section, rank_type_name, group_name, device):
    """A chain forward (i -> i+1) and backward (i -> i-1) over the group."""
    rank_type = getattr(smp.RankType, rank_type_name)
    members = members_of(group_name)
    n = len(members)
    if n < 2:
        return
    me = smp.rank()
    r = members.index(me)
    for dtype in DTYPES:
        tag = f"{rank_type_name} {str(dtype).replace('torch.', '')}"
        base = pattern(1000, dtype, device)
        # forward: receive from r-1 first, then send to r+1 (no cycle, no deadlock)
        if r > 0:
            t = torch.zeros_like(base)
            smp.comm.recv(t, r - 1, rank_type)
            checker.expect(section, f"{tag} recv from {r - 1}", t, (members[r - 1] + 1) * base)
        if r < n - 1:
            smp.comm.send((me + 1) * base, r + 1, rank_type)
        # backward
        if r < n - 1:
            t = torch.zeros_like(base)
            smp.comm.recv(t, r + 1, rank_type)
            checker.expect(section, f"{tag} recv from {r + 1}", t, (members[r + 1] + 1) * base)
        if r > 0:
            smp.comm.send((me + 1) * base, r - 1, rank_type)
    synchronize()


def check_bandwidth(checker, section, device):
    n = smp.size()
    numel = BANDWIDTH_BYTES // 4
    t = torch.full((numel,), float(smp.rank() + 1), device=device)
    smp.comm.allreduce(t, group=smp.CommGroup.WORLD, op=smp.ReduceOp.SUM)  # warm-up
    iters = 5
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        t.fill_(float(smp.rank() + 1))
        smp.comm.allreduce(t, group=smp.CommGroup.WORLD, op=smp.ReduceOp.SUM)
    synchronize()
    elapsed = (time.perf_counter() - start) / iters
    expected = float(n * (n + 1) // 2)
    checker.check(section, "64 MiB allreduce values",
                  bool(torch.all(t == expected).item()),
                  f"min {t.min().item()} max {t.max().item()}, expected {expected}")
    # 64 MiB broadcast from the last rank
    t.fill_(float(smp.rank()))
    smp.comm.broadcast(t, n - 1, smp.CommGroup.WORLD)
    checker.check(section, "64 MiB broadcast values", bool(torch.all(t == float(n - 1)).item()))
    synchronize()
    if smp.rank() == 0:
        bus = 2 * (n - 1) / n * BANDWIDTH_BYTES / elapsed / 1e9
        print(f"nccl_collectives: 64 MiB allreduce over {n} ranks: {elapsed * 1e3:.2f} ms, "
              f"bus bandwidth {bus:.1f} GB/s", flush=True)


def check_cpu_path(checker, section, device):
    """A CPU tensor goes over the host communicator, between NCCL calls."""
    n = smp.size()
    g = (smp.rank() + 1) * pattern(16, torch.float32, device)
    smp.comm.allreduce(g, group=smp.CommGroup.WORLD)
    c = torch.full((16,), float(smp.rank() + 1))
    smp.comm.allreduce(c, group=smp.CommGroup.WORLD, op=smp.ReduceOp.SUM)
    checker.check(section, "cpu tensor stays on cpu", c.device.type == "cpu")
    checker.expect(section, "cpu allreduce", c, torch.full((16,), float(n * (n + 1) // 2)))
    out = smp.comm.allgather(torch.tensor([smp.rank()], dtype=torch.int64), smp.CommGroup.WORLD)
    checker.check(section, "cpu allgather stays on cpu", out.device.type == "cpu")
    checker.expect(section, "cpu allgather", out, torch.arange(n, dtype=torch.int64).reshape(n, 1))
    checker.expect(section, "cuda allreduce around cpu calls", g,
                   (n * (n + 1) // 2) * pattern(16, torch.float32, device))
    smp.barrier(smp.CommGroup.WORLD)


def run_layout(checker, config):
    """Runs every check on one layout; returns the failures so far over all ranks."""
    smp.init(config)
    try:
        checker.is_root = smp.rank() == 0
        if DEVICE_TYPE == "cuda":
            torch.cuda.set_device(smp.local_rank())
            device = torch.device("cuda", smp.local_rank())
        else:
            device = torch.device(DEVICE_TYPE)
        label = ", ".join(f"{k}={v}" for k, v in config.items())
        if smp.rank() == 0:
            print(f"nccl_collectives: layout {{{label}}}: pp={smp.pp_size()} tp={smp.tp_size()} "
                  f"rdp={smp.rdp_size()} tp_group={smp.get_tp_group()} "
                  f"pp_group={smp.get_pp_group()} dp_group={smp.get_dp_group()}", flush=True)
        # The group lists must agree with the rank queries.
        for name, rank_fn in (("TP_GROUP", smp.tp_rank), ("PP_GROUP", smp.pp_rank),
                              ("DP_GROUP", smp.dp_rank)):
            members = members_of(name)
            checker.check("layout", f"{name} index of this rank == rank query",
                          smp.rank() in members and members.index(smp.rank()) == rank_fn(),
                          f"members {members}, rank query {rank_fn()}")
        for group_name in GROUPS:
            section = f"[{label}] {group_name} collectives"
            before, start = agree_failures(checker), time.perf_counter()
            check_group(checker, section, group_name, device)
            report(checker, section, start, before)
        for rank_type_name, group_name in RANK_TYPES:
            section = f"[{label}] {rank_type_name} send/recv"
            before, start = agree_failures(checker), time.perf_counter()
            check_send_recv(checker, section, rank_type_name, group_name, device)
            report(checker, section, start, before)
        for section, fn in ((f"[{label}] 64 MiB", check_bandwidth),
                            (f"[{label}] cpu tensors over the host communicator",
                             check_cpu_path)):
            before, start = agree_failures(checker), time.perf_counter()
            fn(checker, section, device)
            report(checker, section, start, before)
        return agree_failures(checker)
    finally:
        smp.shutdown()


def main():
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "0")))
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK",
                               os.environ.get("MPI_LOCALRANKID", "0")))
    if DEVICE_TYPE == "cuda" and not torch.cuda.is_available():
        print("nccl_collectives: no CUDA device", file=sys.stderr)
        return 2
    if DEVICE_TYPE == "cuda" and torch.cuda.device_count() <= local:
        print(f"nccl_collectives: local rank {local} has no GPU "
              f"({torch.cuda.device_count()} visible); start at most one rank per GPU",
              file=sys.stderr)
        return 2
    configs = layouts(world) if world >= 2 else []
    only = os.environ.get("NCCL_COLLECTIVES_LAYOUT")
    if only is not None and configs:
        configs = [configs[int(only)]]
    if not configs:
        print("nccl_collectives: needs at least 2 ranks (mpirun -np 2)", file=sys.stderr)
        return 2
    checker = Checker()
    total = 0
    for config in configs:
        total = run_layout(checker, config)
    if total:
        if checker.is_root:
            print(f"nccl_collectives: FAILED ({total} failed checks over all ranks)", flush=True)
        return 1
    if checker.is_root:
        print("nccl_collectives: OK", flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # noqa: BLE001 - any error must end the whole job, not hang it
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
