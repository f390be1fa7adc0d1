"""The rank-grid formulas of smp v1 (DESIGN.md section 2) written out in plain
Python, independent of the engine, as the reference the tests compare with."""

import itertools

PLACEMENTS = ["".join(p) for p in itertools.permutations("DPT")]
ALIASES = {"cluster": "DPT", "spread": "TPD"}

# The worked example of DESIGN.md: 8 ranks, tp = pp = rdp = 2, cluster.
# Columns: rank, rdp, pp, tp, dp, mp.
DESIGN_TABLE = [
    (0, 0, 0, 0, 0, 0),
    (1, 0, 0, 1, 1, 1),
    (2, 0, 1, 0, 0, 2),
    (3, 0, 1, 1, 1, 3),
    (4, 1, 0, 0, 2, 0),
    (5, 1, 0, 1, 3, 1),
    (6, 1, 1, 0, 2, 2),
    (7, 1, 1, 1, 3, 3),
]


def letters(placement):
    return ALIASES.get(placement, placement)


def ranks(rank, world, pp, tp, placement="cluster"):
    """{"rank", "rdp", "pp", "tp", "dp", "mp"} of a world rank."""
    order = letters(placement)
    rdp_size = world // (pp * tp)
    sizes = {"D": rdp_size, "P": pp, "T": tp}
    c = {}
    r = rank
    for axis in reversed(order):  # the right-most letter varies fastest
        c[axis] = r % sizes[axis]
        r //= sizes[axis]
    rdp, p, t = c["D"], c["P"], c["T"]
    dp = t + tp * rdp if order.index("T") > order.index("D") else rdp + rdp_size * t
    mp = t + tp * p if order.index("T") > order.index("P") else p + pp * t
    return {"rank": rank, "rdp": rdp, "pp": p, "tp": t, "dp": dp, "mp": mp}


def sizes(world, pp, tp):
    return {
        "size": world,
        "pp_size": pp,
        "tp_size": tp,
        "dp_size": world // pp,
        "rdp_size": world // (pp * tp),
        "mp_size": pp * tp,
    }


# group kind -> (coordinates its members share, rank type that orders it)
GROUP_RULES = {
    "WORLD": ((), "rank"),
    "PP_GROUP": (("tp", "rdp"), "pp"),
    "TP_GROUP": (("pp", "rdp"), "tp"),
    "RDP_GROUP": (("pp", "tp"), "rdp"),
    "DP_GROUP": (("pp",), "dp"),
    "MP_GROUP": (("rdp",), "mp"),
}


def group_members(kind, rank, world, pp, tp, placement="cluster"):
    """World ranks of `rank`'s group of this kind, ordered by the group's rank type."""
    shared, order_by = GROUP_RULES[kind]
    me = ranks(rank, world, pp, tp, placement)
    all_ranks = [ranks(r, world, pp, tp, placement) for r in range(world)]
    members = [r for r in all_ranks if all(r[k] == me[k] for k in shared)]
    members.sort(key=lambda r: r[order_by])
    return [r["rank"] for r in members]


def all_groups(kind, world, pp, tp, placement="cluster"):
    groups = {tuple(group_members(kind, r, world, pp, tp, placement)) for r in range(world)}
    return sorted((list(g) for g in groups), key=min)
