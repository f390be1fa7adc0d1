# mpirun -np 8, pp 2 x tp 2 x rdp 2: the object API (pickled Python objects).
import torch

import smp

smp.init({"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True})
r = smp.rank()
n = smp.size()
assert n == 8, n


def payload(src, tag):
    return {"src": src, "tag": tag, "t": torch.arange(4, dtype=torch.float32) * src,
            "nested": [src, (tag, None)]}


def check(obj, src, tag):
    assert obj["src"] == src and obj["tag"] == tag, (obj, src, tag, r)
    assert torch.equal(obj["t"], torch.arange(4, dtype=torch.float32) * src)
    assert obj["nested"] == [src, (tag, None)]


# broadcast / recv_from over each group: group rank `root` sends to every other member.
cases = [
    (smp.WORLD, smp.RankType.WORLD_RANK, 0, smp.rank),
    (smp.WORLD, smp.RankType.WORLD_RANK, 5, smp.rank),
    (smp.PP_GROUP, smp.RankType.PP_RANK, 0, smp.pp_rank),
    (smp.TP_GROUP, smp.RankType.TP_RANK, 1, smp.tp_rank),
    (smp.DP_GROUP, smp.RankType.DP_RANK, 0, smp.dp_rank),
    (smp.DP_GROUP, smp.RankType.DP_RANK, 3, smp.dp_rank),
    (smp.RDP_GROUP, smp.RankType.RDP_RANK, 1, smp.rdp_rank),
    (smp.MP_GROUP, smp.RankType.MP_RANK, 2, smp.mp_rank),
]
for group, rank_type, root, my_rank in cases:
    members = smp._C.group_members(group)
    tag = f"bcast-{group.name}-{root}"
    if my_rank() == root:
        obj = payload(r, tag)
        assert smp.broadcast(obj, group) is obj
    else:
        check(smp.recv_from(root, rank_type), members[root], tag)
smp.barrier()

# smp v1 usage on the world
if smp.rank() == 0:
    x = smp.broadcast({"lr": 0.1}, smp.WORLD)
else:
    x = smp.recv_from(0, smp.RankType.WORLD_RANK)
assert x == {"lr": 0.1}

# send/recv ring over WORLD_RANK (even ranks send first), with a large message too
big = torch.full((1 << 20,), float(r))  # 4 MiB
nxt, prv = (r + 1) % n, (r - 1) % n
for obj in ({"from": r}, big):
    if r % 2 == 0:
        smp.send(obj, nxt, smp.RankType.WORLD_RANK)
        got = smp.recv_from(prv, smp.RankType.WORLD_RANK)
    else:
        got = smp.recv_from(prv, smp.RankType.WORLD_RANK)
        smp.send(obj, nxt, smp.RankType.WORLD_RANK)
    if isinstance(obj, dict):
        assert got == {"from": prv}, got
    else:
        assert torch.equal(got, torch.full((1 << 20,), float(prv)))

# ring over PP_RANK (two stages: exchange with the other stage)
other = 1 - smp.pp_rank()
if smp.pp_rank() == 0:
    smp.send(("stage", smp.pp_rank(), r), other, smp.RankType.PP_RANK)
    got = smp.recv_from(other, smp.RankType.PP_RANK)
else:
    got = smp.recv_from(other, smp.RankType.PP_RANK)
    smp.send(("stage", smp.pp_rank(), r), other, smp.RankType.PP_RANK)
assert got == ("stage", other, smp.get_pp_group()[other]), got

# allgather over every group: ordered by group rank
getters = {smp.WORLD: smp.get_world_group, smp.PP_GROUP: smp.get_pp_group,
           smp.TP_GROUP: smp.get_tp_group, smp.RDP_GROUP: smp.get_rdp_group,
           smp.DP_GROUP: smp.get_dp_group, smp.MP_GROUP: smp.get_mp_group}
for group, get in getters.items():
    assert smp.allgather(r, group) == get(), (group, r)
assert smp.allgather({"r": r, "t": torch.tensor([r])}, smp.TP_GROUP)[smp.tp_rank()]["r"] == r

# gather: the list on the given group rank, None elsewhere
g = smp.gather(r * 10, smp.TP_GROUP, rank=1)
assert g == ([m * 10 for m in smp.get_tp_group()] if smp.tp_rank() == 1 else None), g
g = smp.gather(r, smp.WORLD)
assert g == (list(range(n)) if r == 0 else None), g

# barriers
smp.barrier()
smp.barrier(smp.TP_GROUP)
smp.dp_barrier()
smp.mp_barrier()
smp.barrier(group=smp.WORLD, timeout=30)

# errors name the rank type, the peer and the valid range
for call in (lambda: smp.recv_from(2, smp.RankType.TP_RANK),
             lambda: smp.send("x", -1, smp.RankType.TP_RANK)):
    try:
        call()
    except smp.ConfigError as e:
        assert "TP_RANK" in str(e) and "TP_RANK 0..1" in str(e), str(e)
    else:
        raise AssertionError("out-of-range TP_RANK peer did not raise")
try:
    smp.gather(1, smp.TP_GROUP, rank=5)
except smp.ConfigError as e:
    assert "rank 5 is not a rank of TP_GROUP" in str(e) and "0..1" in str(e), str(e)
else:
    raise AssertionError("gather with rank 5 on TP_GROUP did not raise")

smp.barrier()
print(f"objects OK {r}", flush=True)
