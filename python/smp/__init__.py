"""smp: a model-parallel training runtime for PyTorch with the API of the
SageMaker model parallel library v1.

    import smp
    smp.init({"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True})
    print(smp.rank(), smp.pp_rank(), smp.tp_rank(), smp.rdp_rank())

``import smdistributed.modelparallel.torch as smp`` gives this same module.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from smp import _C
from smp._C import (
    CheckpointError,
    CommError,
    CommGroup,
    CommTimeoutError,
    ConfigError,
    CorruptCheckpointError,
    NotSupportedError,
    RankType,
    ReduceOp,
    SMPError,
    StateError,
    UnsafeLoadError,
)

WORLD = CommGroup.WORLD
PP_GROUP = CommGroup.PP_GROUP
TP_GROUP = CommGroup.TP_GROUP
RDP_GROUP = CommGroup.RDP_GROUP
DP_GROUP = CommGroup.DP_GROUP
MP_GROUP = CommGroup.MP_GROUP

WORLD_RANK = RankType.WORLD_RANK
PP_RANK = RankType.PP_RANK
TP_RANK = RankType.TP_RANK
RDP_RANK = RankType.RDP_RANK
DP_RANK = RankType.DP_RANK
MP_RANK = RankType.MP_RANK

from smp._runtime import (  # noqa: E402
    config,
    dp_rank,
    dp_size,
    get_dp_group,
    get_mp_group,
    get_pp_group,
    get_rdp_group,
    get_tp_group,
    get_world_group,
    init,
    is_initialized,
    local_rank,
    local_size,
    mp_rank,
    mp_size,
    pp_rank,
    pp_size,
    rank,
    rdp_rank,
    rdp_size,
    shutdown,
    size,
    tp_rank,
    tp_size,
)
from smp._objects import (  # noqa: E402
    allgather,
    barrier,
    broadcast,
    dp_barrier,
    gather,
    mp_barrier,
    recv_from,
    send,
)
from smp.torch_dist import (  # noqa: E402
    get_dp_process_group,
    get_mp_process_group,
    get_pp_process_group,
    get_rdp_process_group,
    get_tp_process_group,
    get_world_process_group,
)
from smp.checkpoint import (  # noqa: E402
    AsyncSaveHandle, async_save, load, resume_from_checkpoint, save, save_checkpoint,
    wait_for_pending_saves)
from smp import comm  # noqa: E402
from smp import nn  # noqa: E402
from smp.tp import (  # noqa: E402
    set_tensor_parallelism,
    tensor_parallelism,
    tp_register,
    tp_register_with_module,
)
from smp import utils  # noqa: E402
from smp.delayed_init import delay_param_initialization  # noqa: E402
from smp.patches.checkpoint import set_activation_checkpointing  # noqa: E402
from smp.model import DistributedModel  # noqa: E402
from smp.optimizer import DistributedOptimizer  # noqa: E402
from smp import pipeline  # noqa: E402
from smp.pipeline import StepOutput, partition, set_partition, step  # noqa: E402
from smp import amp  # noqa: E402
from smp import optimizers  # noqa: E402
from smp._state import num_microbatches, state  # noqa: E402
from smp import patches  # noqa: E402
from smp.patches.checkpoint import checkpoint_sequential  # noqa: E402
from smp._compat import (  # noqa: E402
    is_tracing,
    model_creation,
    pp_barrier,
    rdp_barrier,
    tp_barrier,
)

__version__ = _C.version()
