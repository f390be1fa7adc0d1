# mpirun -np 8 (pp 2 x tp 2 x rdp 2, or another layout from argv): the torch
# process groups smp.init creates when ddp is on.
import sys

import torch
import torch.distributed as dist

import smp

pp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tp = int(sys.argv[2]) if len(sys.argv) > 2 else 2
placement = sys.argv[3] if len(sys.argv) > 3 else "cluster"
smp.init({"pipeline_parallel_degree": pp, "tensor_parallel_degree": tp, "ddp": True,
          "placement_strategy": placement})
r = smp.rank()
assert dist.is_initialized()
assert dist.get_rank() == r and dist.get_world_size() == smp.size()
assert dist.get_backend() == "gloo", dist.get_backend()

# the check of the task: all_reduce over this rank's DP and TP process groups
x = torch.full((4,), float(r + 1))
dist.all_reduce(x, group=smp.get_dp_process_group())
assert torch.equal(x, torch.full((4,), float(sum(m + 1 for m in smp.get_dp_group())))), x
y = torch.full((4,), float(r + 1))
dist.all_reduce(y, group=smp.get_tp_process_group())
assert torch.equal(y, torch.full((4,), float(sum(m + 1 for m in smp.get_tp_group())))), y

pairs = [(smp.get_world_process_group, smp.get_world_group),
         (smp.get_pp_process_group, smp.get_pp_group),
         (smp.get_rdp_process_group, smp.get_rdp_group),
         (smp.get_mp_process_group, smp.get_mp_group)]
for get_pg, get_members in pairs:
    pg = get_pg()
    members = get_members()
    assert dist.get_world_size(pg) == len(members), (get_pg.__name__, members)
    assert sorted(dist.get_process_group_ranks(pg)) == sorted(members)
    z = torch.tensor([float(r)])
    dist.all_reduce(z, op=dist.ReduceOp.MAX, group=pg)
    assert z.item() == max(members), (get_pg.__name__, z)

smp.shutdown()
assert not dist.is_initialized()
try:
    smp.get_dp_process_group()
except smp.StateError as e:
    assert "before smp.init()" in str(e), str(e)
else:
    raise AssertionError("get_dp_process_group after shutdown did not raise")
print(f"torch_dist OK {r}", flush=True)
