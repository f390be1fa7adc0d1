# mpirun -np N ranks.py PP TP PLACEMENT: every rank and size function and every
# group list against the formulas of DESIGN.md and against smp._C.Topology.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grid_reference as ref  # noqa: E402

import smp  # noqa: E402

pp, tp, placement = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
config = {"pipeline_parallel_degree": pp, "tensor_parallel_degree": tp,
          "placement_strategy": placement}
if world > pp * tp or tp > 1:
    config["ddp"] = True
smp.init(config)

r = smp.rank()
assert smp._C.launch_kind() == "mpi", smp._C.launch_kind()
assert smp.size() == world
assert 0 <= r < world
assert smp.local_size() == world and smp.local_rank() == r  # one node
want = ref.ranks(r, world, pp, tp, placement)
got = {"rank": r, "rdp": smp.rdp_rank(), "pp": smp.pp_rank(), "tp": smp.tp_rank(),
       "dp": smp.dp_rank(), "mp": smp.mp_rank()}
assert got == want, (got, want)
sizes = {"size": smp.size(), "pp_size": smp.pp_size(), "tp_size": smp.tp_size(),
         "dp_size": smp.dp_size(), "rdp_size": smp.rdp_size(), "mp_size": smp.mp_size()}
assert sizes == ref.sizes(world, pp, tp), sizes

getters = {"WORLD": smp.get_world_group, "PP_GROUP": smp.get_pp_group,
           "TP_GROUP": smp.get_tp_group, "RDP_GROUP": smp.get_rdp_group,
           "DP_GROUP": smp.get_dp_group, "MP_GROUP": smp.get_mp_group}
topo = smp._C.Topology(world, pp, tp, placement)
for name, get in getters.items():
    members = get()
    assert isinstance(members, list)
    assert members == ref.group_members(name, r, world, pp, tp, placement), (name, members)
    assert members == topo.group_members(smp.CommGroup[name], r), name
    assert members.index(r) == smp._C.rank_of_type(smp.RankType(int(smp.CommGroup[name])))

# Every rank agrees on where everyone sits.
table = smp.allgather((r, got["rdp"], got["pp"], got["tp"], got["dp"], got["mp"]), smp.WORLD)
assert [row[0] for row in table] == list(range(world))
for row in table:
    w = ref.ranks(row[0], world, pp, tp, placement)
    assert row == (w["rank"], w["rdp"], w["pp"], w["tp"], w["dp"], w["mp"]), row

smp.barrier()
print(f"ranks OK {r}", flush=True)
