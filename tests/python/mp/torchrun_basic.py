# python -m torch.distributed.run --standalone --nproc_per_node 2: tp 2 + ddp on the
# gloo host backend: ranks, object API, tensor collectives, torch process groups.
import os

import torch
import torch.distributed as dist

import smp

smp.init({"tensor_parallel_degree": 2, "ddp": True})
r = smp.rank()
assert smp._C.launch_kind() == "torchrun", smp._C.launch_kind()
assert smp._C.comm_backend(smp.WORLD) == "gloo", smp._C.comm_backend(smp.WORLD)
assert r == int(os.environ["RANK"]) and smp.size() == int(os.environ["WORLD_SIZE"]) == 2
assert smp.local_rank() == int(os.environ["LOCAL_RANK"]) and smp.local_size() == 2
assert (smp.tp_rank(), smp.tp_size(), smp.pp_size(), smp.rdp_size(), smp.dp_size()) == (
    r, 2, 1, 1, 2)
assert smp.get_tp_group() == [0, 1]

# objects
if r == 0:
    smp.broadcast({"step": 7, "t": torch.arange(3)}, smp.TP_GROUP)
else:
    got = smp.recv_from(0, smp.RankType.TP_RANK)
    assert got["step"] == 7 and torch.equal(got["t"], torch.arange(3)), got
assert smp.allgather(("r", r), smp.WORLD) == [("r", 0), ("r", 1)]
if r == 0:
    smp.send([1, 2, 3], 1, smp.RankType.WORLD_RANK)
    assert smp.recv_from(1, smp.RankType.WORLD_RANK) == "back"
else:
    assert smp.recv_from(0, smp.RankType.WORLD_RANK) == [1, 2, 3]
    smp.send("back", 0, smp.RankType.WORLD_RANK)
smp.barrier()
smp.dp_barrier()

# tensors
t = torch.full((4,), float(r + 1))
smp.comm.allreduce(t, smp.TP_GROUP)
assert torch.equal(t, torch.full((4,), 3.0)), t
g = smp.comm.allgather(torch.tensor([r, 10 * r]), smp.DP_GROUP)
assert torch.equal(g, torch.tensor([[0, 0], [1, 10]])), g
y = smp.comm.reduce_scatter(torch.arange(4.0) * (r + 1), smp.WORLD)
assert torch.equal(y, (torch.arange(4.0) * 3)[2 * r:2 * r + 2]), y
b = smp.comm.broadcast(torch.full((2,), float(r)), 1, smp.WORLD)
assert torch.equal(b, torch.ones(2)), b
if r == 0:
    smp.comm.send(torch.tensor([5.0]), 1, smp.RankType.TP_RANK)
else:
    assert smp.comm.recv(torch.empty(1), 0, smp.RankType.TP_RANK).item() == 5.0

# torch process groups
x = torch.full((2,), float(r + 1))
dist.all_reduce(x, group=smp.get_dp_process_group())
assert torch.equal(x, torch.full((2,), 3.0)), x

smp.shutdown()
print(f"torchrun OK {r}", flush=True)
