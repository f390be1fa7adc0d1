# mpirun -np 2: rank 1 dies of an uncaught exception while rank 0 waits in a
# barrier; the job must end promptly with a failure instead of hanging.
import smp

smp.init({"pipeline_parallel_degree": 2})
if smp.rank() == 1:
    raise RuntimeError("deliberate failure on rank 1")
smp.barrier(timeout=200)
print("rank 0 passed the barrier: the job did not end", flush=True)
