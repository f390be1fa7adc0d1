# mpirun -np 2 (or torchrun --nproc_per_node 2): rank 1 dies of an uncaught
# exception while rank 0 waits in a barrier. The job must end promptly with a
# failure, and its output must carry rank 1's traceback (prefixed with the rank)
# and smp's "ending the job" line.
#   abort_on_exception.py          pp 2, no torch.distributed
#   abort_on_exception.py ddp      ddp: torch.distributed initialized, a torch
#                                  group created through smp.get_dp_process_group()
import sys

import smp

ddp = "ddp" in sys.argv[1:]
smp.init({"pipeline_parallel_degree": 2, "ddp": ddp})
if ddp:
    smp.get_dp_process_group()
if smp.rank() == 1:
    raise RuntimeError("deliberate failure on rank 1")
smp.barrier(timeout=200)
print("rank 0 passed the barrier: the job did not end", flush=True)
