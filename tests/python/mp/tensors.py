# mpirun -np 8 (pp 2 x tp 2 x rdp 2) or -np 2 (tp 2): tensor collectives on CPU tensors.
import math
import sys

import torch

import smp

pp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tp = int(sys.argv[2]) if len(sys.argv) > 2 else 2
smp.init({"pipeline_parallel_degree": pp, "tensor_parallel_degree": tp, "ddp": True})
r = smp.rank()
n = smp.size()
C = smp.comm
groups = {smp.WORLD: smp.get_world_group(), smp.PP_GROUP: smp.get_pp_group(),
          smp.TP_GROUP: smp.get_tp_group(), smp.RDP_GROUP: smp.get_rdp_group(),
          smp.DP_GROUP: smp.get_dp_group(), smp.MP_GROUP: smp.get_mp_group()}

for group in (smp.TP_GROUP, smp.DP_GROUP, smp.WORLD, smp.PP_GROUP, smp.RDP_GROUP):
    members = groups[group]
    vals = [m + 1 for m in members]
    for dtype in (torch.float32, torch.float64, torch.int64, torch.int32):
        t = torch.full((5,), r + 1, dtype=dtype)
        out = C.allreduce(t, group, smp.ReduceOp.SUM)
        assert out is t
        assert torch.equal(t, torch.full((5,), sum(vals), dtype=dtype)), (group, dtype, t)
    t = torch.full((3, 2), float(r + 1))
    C.allreduce(t, group, smp.ReduceOp.AVG)
    assert torch.allclose(t, torch.full((3, 2), sum(vals) / len(vals))), (group, t)
    t = torch.tensor([float(r), -float(r)])
    C.allreduce(t, group=group, op=smp.ReduceOp.MAX, timeout=30)
    assert t.tolist() == [max(members), -min(members)], (group, t)
    t = torch.tensor([float(r)])
    C.allreduce(t, group, smp.ReduceOp.MIN)
    assert t.item() == min(members)
    t = torch.tensor([float(r + 1)])
    C.allreduce(t, group, smp.ReduceOp.PRODUCT)
    assert t.item() == math.prod(vals)

    # allgather: [group size, *shape], member i's tensor at [i]
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100 * r
    g = C.allgather(t, group)
    assert g.shape == (len(members), 2, 3), g.shape
    for i, m in enumerate(members):
        assert torch.equal(g[i], torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100 * m)

    # reduce_scatter: block j of every member's input, reduced, lands on group rank j
    k = len(members)
    me = members.index(r)
    x = torch.cat([torch.full((2, 3), float((r + 1) * (j + 1))) for j in range(k)])
    y = C.reduce_scatter(x, group, smp.ReduceOp.SUM)
    assert y.shape == (2, 3), y.shape
    assert torch.equal(y, torch.full((2, 3), float(sum(vals) * (me + 1)))), (group, y)

    # broadcast from the last group rank
    root = k - 1
    t = torch.full((4,), float(r))
    assert C.broadcast(t, root, group) is t
    assert torch.equal(t, torch.full((4,), float(members[root]))), (group, t)
    C.barrier(group)

# send/recv between pipeline stages (PP_RANK) and in a ring over WORLD_RANK
if pp == 2:
    t = torch.full((3,), float(r))
    if smp.pp_rank() == 0:
        C.send(t, 1, smp.RankType.PP_RANK)
        back = C.recv(torch.empty(3), 1, smp.RankType.PP_RANK)
        assert torch.equal(back, torch.full((3,), float(groups[smp.PP_GROUP][1]))), back
    else:
        got = C.recv(torch.empty(3), 0, smp.RankType.PP_RANK)
        assert torch.equal(got, torch.full((3,), float(groups[smp.PP_GROUP][0]))), got
        C.send(t, 0, smp.RankType.PP_RANK)
nxt, prv = (r + 1) % n, (r - 1) % n
big = torch.full((1 << 20,), float(r))
buf = torch.empty(1 << 20)
if r % 2 == 0:
    C.send(big, nxt)
    C.recv(buf, prv, smp.RankType.WORLD_RANK)
else:
    C.recv(buf, prv, smp.RankType.WORLD_RANK)
    C.send(big, nxt)
assert torch.equal(buf, torch.full((1 << 20,), float(prv)))

# tensor-parallel peer over TP_RANK
other = 1 - smp.tp_rank()
t = torch.tensor([r], dtype=torch.int64)
out = torch.empty(1, dtype=torch.int64)
if smp.tp_rank() == 0:
    C.send(t, other, smp.RankType.TP_RANK)
    C.recv(out, other, smp.RankType.TP_RANK)
else:
    C.recv(out, other, smp.RankType.TP_RANK)
    C.send(t, other, smp.RankType.TP_RANK)
assert out.item() == groups[smp.TP_GROUP][other]

C.barrier()
print(f"tensors OK {r}", flush=True)
