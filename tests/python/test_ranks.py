"""Rank functions and group lists under mpirun (one job per layout: MPI cannot
be initialized twice in a process)."""

import re

import pytest

import grid_reference as ref
from conftest import ok_ranks, run_mpi, run_mpi_code

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

# (np, pp, tp, placement)
LAYOUTS = [
    (1, 1, 1, "cluster"),
    (2, 1, 1, "cluster"),
    (2, 2, 1, "cluster"),
    (2, 1, 2, "spread"),
    (4, 2, 1, "cluster"),
    (4, 2, 2, "cluster"),
    (4, 1, 2, "spread"),
] + [(8, 2, 2, p) for p in ref.PLACEMENTS] + [(8, 4, 1, "spread"), (8, 2, 4, "PTD")]


@pytest.mark.parametrize("np, pp, tp, placement", LAYOUTS,
                         ids=[f"np{n}-pp{p}-tp{t}-{pl}" for n, p, t, pl in LAYOUTS])
def test_rank_functions(np, pp, tp, placement):
    out = run_mpi(np, "ranks.py", pp, tp, placement).stdout
    assert ok_ranks(out, "ranks") == list(range(np)), out


def test_issue_check_np8_matches_design_table():
    code = ('import smp; smp.init({"pipeline_parallel_degree":2,"tensor_parallel_degree":2,'
            '"ddp":True}); print(smp.rank(), smp.rdp_rank(), smp.pp_rank(), smp.tp_rank(), '
            'smp.dp_rank(), smp.mp_rank())')
    out = run_mpi_code(8, code, tag_output=True).stdout
    # mpirun tags each chunk a rank writes ("[job,rank]<stdout>:"), and an
    # unbuffered print writes a line in several chunks: rebuild each rank's stream.
    streams = {}
    pieces = re.split(r"\[\d+,(\d+)\]<stdout>:", out)
    for rank, text in zip(pieces[1::2], pieces[2::2]):
        streams[int(rank)] = streams.get(int(rank), "") + text
    rows = []
    for stream in streams.values():
        for line in stream.splitlines():
            parts = line.split()
            if len(parts) == 6 and all(p.isdigit() for p in parts):
                rows.append(tuple(int(p) for p in parts))
    assert sorted(rows) == ref.DESIGN_TABLE, out
