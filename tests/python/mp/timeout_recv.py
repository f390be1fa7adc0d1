# mpirun -np 2 with SMP_COMM_TIMEOUT=2: rank 1 waits for a message rank 0 never
# sends; recv_from must raise smp.CommTimeoutError naming the group and the rank.
import time

import smp

smp.init({"pipeline_parallel_degree": 2})
assert smp._C.default_timeout() == 2.0, smp._C.default_timeout()
r = smp.rank()
if r == 1:
    t0 = time.monotonic()
    try:
        smp.recv_from(0, smp.RankType.WORLD_RANK)
    except smp.CommTimeoutError as e:
        elapsed = time.monotonic() - t0
        msg = str(e)
        assert isinstance(e, smp.CommError) and isinstance(e, TimeoutError)
        assert "WORLD" in msg, msg
        assert "rank 1" in msg, msg
        assert 1.5 <= elapsed < 30, elapsed
        print("timeout message:", msg, flush=True)
    else:
        raise AssertionError("recv_from a silent peer did not time out")
    # an explicit timeout overrides the default
    t0 = time.monotonic()
    try:
        smp.recv_from(0, smp.RankType.WORLD_RANK, timeout=0.5)
    except smp.CommTimeoutError:
        assert time.monotonic() - t0 < 1.9
    else:
        raise AssertionError("recv_from(timeout=0.5) did not time out")
smp.barrier(timeout=60)
# the world communicator stays usable after a timed-out receive
assert smp.allgather(r, smp.WORLD, timeout=60) == [0, 1]
smp.barrier(timeout=60)
print(f"timeout OK {r}", flush=True)
