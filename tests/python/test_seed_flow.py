"""Issue 5's end-to-end test: the seed document's checkpoint flow (Options 1 and
2) with pipeline x tensor parallelism, on 4 ranks (pp2 x tp2) and 8 ranks
(pp2 x tp2 x rdp2), with and without shard_optimizer_state. See
tests/python/mp/seed_flow.py for what each run checks."""

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(420)]


@pytest.mark.parametrize("np_", [4, 8])
@pytest.mark.parametrize("shard", [0, 1])
def test_seed_flow(tmp_path, np_, shard):
    out = run_mpi(np_, "seed_flow.py", tmp_path, shard).stdout
    assert ok_ranks(out, "seed_flow") == list(range(np_)), out
