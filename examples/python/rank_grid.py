"""The rank grid, the groups and a few checked collectives (the Python twin of
examples/cpp/rank_grid.cc).

    mpirun -np 8 python3 examples/python/rank_grid.py    # PYTHONPATH=python, after a build
    torchrun --nproc-per-node 8 examples/python/rank_grid.py

With a world size that is a multiple of 4 it uses pipeline_parallel_degree=2,
tensor_parallel_degree=2 and ddp (8 ranks: 2 model replicas of 4 ranks each);
otherwise plain data parallelism (pp = tp = 1). "ddp": True also makes smp.init
create the torch.distributed process groups. Every result is checked against
the arithmetic of the rank grid; the last line on rank 0 is "rank_grid: OK".

examples/python/train.py is the main demo: training with checkpoint save and resume.
"""

import os
import sys

import torch
import torch.distributed as dist

import smp


def launched_world_size():
    """World size from the launcher's environment, before smp.init."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def make_config(world):
    if world % 4 == 0:
        return {"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True}
    return {"pipeline_parallel_degree": 1, "tensor_parallel_degree": 1, "ddp": True}


def check(cond, what):
    if not cond:
        raise AssertionError(f"demo check failed on rank {smp.rank()}: {what}")


def say(*args):
    if smp.rank() == 0:
        print(*args, flush=True)


GROUPS = [
    ("TP_GROUP", smp.CommGroup.TP_GROUP, smp.get_tp_group),
    ("PP_GROUP", smp.CommGroup.PP_GROUP, smp.get_pp_group),
    ("RDP_GROUP", smp.CommGroup.RDP_GROUP, smp.get_rdp_group),
    ("DP_GROUP", smp.CommGroup.DP_GROUP, smp.get_dp_group),
    ("MP_GROUP", smp.CommGroup.MP_GROUP, smp.get_mp_group),
    ("WORLD", smp.CommGroup.WORLD, smp.get_world_group),
]


def show_rank_grid():
    """Rank 0 prints every rank's coordinates, gathered with the object API."""
    me = {
        "rank": smp.rank(),
        "local": smp.local_rank(),
        "rdp": smp.rdp_rank(),
        "pp": smp.pp_rank(),
        "tp": smp.tp_rank(),
        "dp": smp.dp_rank(),
        "mp": smp.mp_rank(),
        "host": os.uname().nodename,
    }
    rows = smp.allgather(me, smp.CommGroup.WORLD)
    check(len(rows) == smp.size(), f"allgather over WORLD gave {len(rows)} rows")
    pp, tp, rdp = smp.pp_size(), smp.tp_size(), smp.rdp_size()
    for r, row in enumerate(rows):
        # Placement "cluster" (DPT): rank = rdp*(pp*tp) + pp*tp_size + tp.
        check(row["rank"] == r, f"row {r} came from rank {row['rank']}")
        check(row["rdp"] * pp * tp + row["pp"] * tp + row["tp"] == r, f"grid position of {row}")
        check(row["dp"] == row["tp"] + tp * row["rdp"], f"dp_rank of {row}")
        check(row["mp"] == row["tp"] + tp * row["pp"], f"mp_rank of {row}")

    say(f"world {smp.size()}: pp_size {pp}, tp_size {tp}, rdp_size {rdp}, "
        f"dp_size {smp.dp_size()}, mp_size {smp.mp_size()}")
    say("")
    cols = ["rank", "rdp", "pp", "tp", "dp", "mp", "local", "host"]
    say("| " + " | ".join(cols) + " |")
    say("|" + "---|" * len(cols))
    for row in rows:
        say("| " + " | ".join(str(row[c]) for c in cols) + " |")
    say("")


def show_groups():
    """Every group kind: this rank's members are checked, rank 0 prints all groups."""
    mine = {}
    for name, group, members_of in GROUPS:
        members = list(members_of())
        check(smp.rank() in members, f"rank {smp.rank()} missing from its {name} {members}")
        mine[name] = tuple(members)
    check(len(mine["TP_GROUP"]) == smp.tp_size(), "TP_GROUP size")
    check(len(mine["PP_GROUP"]) == smp.pp_size(), "PP_GROUP size")
    check(len(mine["RDP_GROUP"]) == smp.rdp_size(), "RDP_GROUP size")
    check(len(mine["DP_GROUP"]) == smp.dp_size(), "DP_GROUP size")
    check(len(mine["MP_GROUP"]) == smp.mp_size(), "MP_GROUP size")
    check(mine["TP_GROUP"].index(smp.rank()) == smp.tp_rank(), "index in TP_GROUP is tp_rank")
    check(mine["PP_GROUP"].index(smp.rank()) == smp.pp_rank(), "index in PP_GROUP is pp_rank")
    check(mine["DP_GROUP"].index(smp.rank()) == smp.dp_rank(), "index in DP_GROUP is dp_rank")

    everyone = smp.allgather(mine, smp.CommGroup.WORLD)
    for name, _, _ in GROUPS:
        groups = sorted({tuple(g[name]) for g in everyone})
        say(f"{name:9} " + " ".join(str(list(g)) for g in groups))
    say("")


def object_collectives():
    """smp v1 semantics: broadcast sends to every other member; they call recv_from."""
    # Broadcast within the tensor-parallel group from tp_rank 0.
    if smp.tp_rank() == 0:
        payload = {"from": smp.rank(), "note": "hello from tp_rank 0"}
        smp.broadcast(payload, smp.CommGroup.TP_GROUP)
    else:
        payload = smp.recv_from(0, smp.RankType.TP_RANK)
    check(payload["from"] == smp.get_tp_group()[0], f"TP broadcast payload {payload}")

    # Point to point along the pipeline: stage 0 -> stage 1.
    if smp.pp_size() > 1:
        if smp.pp_rank() == 0:
            smp.send({"stage": 0, "rank": smp.rank()}, 1, smp.RankType.PP_RANK)
        elif smp.pp_rank() == 1:
            msg = smp.recv_from(0, smp.RankType.PP_RANK)
            check(msg == {"stage": 0, "rank": smp.get_pp_group()[0]}, f"PP message {msg}")

    smp.barrier()
    say("object API: allgather, broadcast/recv_from, send/recv_from, barrier  ok")


def tensor_collectives():
    """smp.comm on CPU tensors, and torch.distributed on smp's process groups."""
    tp_members = smp.get_tp_group()
    t = torch.full((4,), float(smp.rank()))
    smp.comm.allreduce(t, group=smp.CommGroup.TP_GROUP, op=smp.ReduceOp.SUM)
    check(torch.equal(t, torch.full((4,), float(sum(tp_members)))), f"TP allreduce gave {t}")

    dp_members = smp.get_dp_group()
    d = torch.tensor([float(smp.rank()), 1.0])
    dist.all_reduce(d, group=smp.get_dp_process_group())
    expect = torch.tensor([float(sum(dp_members)), float(len(dp_members))])
    check(torch.equal(d, expect), f"torch.distributed all_reduce over DP gave {d}")

    say("tensors: smp.comm.allreduce over TP_GROUP, "
        "torch.distributed.all_reduce over smp.get_dp_process_group()  ok")


def main():
    world = launched_world_size()
    config = make_config(world)
    smp.init(config)
    if world % 4 != 0:
        say(f"note: world size {world} is not a multiple of 4; using pp = tp = 1")
    say(f"smp.init({config})")
    show_rank_grid()
    show_groups()
    object_collectives()
    tensor_collectives()
    smp.barrier()
    say("rank_grid: OK")
    smp.shutdown()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one clear line per failing rank, then a non-zero exit
        print(f"demo: FAILED on rank {os.environ.get('OMPI_COMM_WORLD_RANK', os.environ.get('RANK', '?'))}: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
