"""smp._C.Topology (no init needed) against the formulas of DESIGN.md."""

import pytest

import grid_reference as ref

pytestmark = pytest.mark.timeout(60)

import smp  # noqa: E402

GROUPS = [smp.CommGroup[name] for name in ref.GROUP_RULES]
LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (8, 2, 2), (8, 4, 1), (8, 1, 4),
           (8, 2, 4), (12, 3, 2), (16, 2, 2), (24, 2, 3)]


def test_design_table():
    t = smp._C.Topology(8, 2, 2)
    rows = [(r, t.rdp_rank(r), t.pp_rank(r), t.tp_rank(r), t.dp_rank(r), t.mp_rank(r))
            for r in range(8)]
    assert rows == ref.DESIGN_TABLE


@pytest.mark.parametrize("placement", ref.PLACEMENTS + ["cluster", "spread"])
@pytest.mark.parametrize("world, pp, tp", LAYOUTS)
def test_ranks_and_groups(world, pp, tp, placement):
    t = smp._C.Topology(world, pp, tp, placement)
    assert t.placement == ref.letters(placement)
    sizes = ref.sizes(world, pp, tp)
    assert (t.world_size, t.pp_size, t.tp_size, t.dp_size, t.rdp_size, t.mp_size) == (
        sizes["size"], sizes["pp_size"], sizes["tp_size"], sizes["dp_size"], sizes["rdp_size"],
        sizes["mp_size"])
    for r in range(world):
        want = ref.ranks(r, world, pp, tp, placement)
        assert t.coord(r) == (want["rdp"], want["pp"], want["tp"])
        assert t.rank_of(want["rdp"], want["pp"], want["tp"]) == r
        assert (t.dp_rank(r), t.mp_rank(r)) == (want["dp"], want["mp"])
        for g in GROUPS:
            members = ref.group_members(g.name, r, world, pp, tp, placement)
            assert t.group_members(g, r) == members, (g.name, r)
            assert t.group_size(g) == len(members)
            # a rank's index in its group is its rank of the group's type
            rt = smp.RankType(int(g))
            assert members.index(r) == t.rank_of_type(r, rt)
    for g in GROUPS:
        assert t.all_groups(g) == ref.all_groups(g.name, world, pp, tp, placement)


def test_peer_world_rank_and_errors():
    t = smp._C.Topology(8, 2, 2)
    assert t.peer_world_rank(5, smp.RankType.TP_RANK, 0) == 4
    assert t.peer_world_rank(5, smp.RankType.PP_RANK, 1) == 7
    with pytest.raises(smp.ConfigError) as e:
        t.peer_world_rank(5, smp.RankType.TP_RANK, 2)
    msg = str(e.value)
    assert "TP_RANK 2 does not exist" in msg and "TP_RANK 0..1" in msg


@pytest.mark.parametrize(
    "args, needle",
    [((6, 4, 1), "6"), ((8, 0, 1), "pipeline"), ((8, 2, 2, "DPX"), "DPX")],
)
def test_bad_topology(args, needle):
    with pytest.raises(smp.ConfigError, match=needle):
        smp._C.Topology(*args)


def test_repr_and_enums():
    t = smp._C.Topology(8, 2, 2, "spread")
    assert repr(t) == "Topology(world_size=8, pp=2, tp=2, placement='TPD')"
    assert smp.WORLD is smp.CommGroup.WORLD and smp.TP_GROUP == 2
    assert smp.WORLD_RANK is smp.RankType.WORLD_RANK
    assert [g.name for g in smp.CommGroup] == list(ref.GROUP_RULES)
    assert [r.name for r in smp.RankType] == ["WORLD_RANK", "PP_RANK", "TP_RANK", "RDP_RANK",
                                              "DP_RANK", "MP_RANK"]
    assert [o.name for o in smp.ReduceOp] == ["SUM", "AVG", "MAX", "MIN", "PRODUCT"]
    assert smp._C.group_of(smp.RankType.DP_RANK) is smp.CommGroup.DP_GROUP
