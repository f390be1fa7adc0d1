"""init/shutdown and the rank queries of the running job."""

import atexit
import os
import sys
import traceback

from smp import _C, torch_dist
from smp._C import CommGroup

# Rank and size queries come straight from the engine; each raises
# smp.StateError before smp.init().
rank = _C.rank
size = _C.size
local_rank = _C.local_rank
local_size = _C.local_size
pp_rank = _C.pp_rank
pp_size = _C.pp_size
tp_rank = _C.tp_rank
tp_size = _C.tp_size
dp_rank = _C.dp_rank
dp_size = _C.dp_size
rdp_rank = _C.rdp_rank
rdp_size = _C.rdp_size
mp_rank = _C.mp_rank
mp_size = _C.mp_size
is_initialized = _C.is_initialized


def init(config=None):
    """Initializes smp; every process of the job calls it with the same config.

    ``config`` is a dict of smp v1 keys (None means {}); the JSON object in the
    environment variable SM_HP_MP_PARAMETERS overrides its keys. With
    ``"ddp": True`` this also creates the torch.distributed process groups
    (see smp.get_dp_process_group()). Raises smp.ConfigError for a bad config
    and smp.StateError when smp is already initialized.

        smp.init({"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True})
    """
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise _C.ConfigError(
            f"smp.init expects a dict of smp config keys, got {type(config).__name__} "
            f"{config!r}; e.g. smp.init({{'pipeline_parallel_degree': 2}})"
        )
    _C.init(config)
    if _C.config()["ddp"]:
        try:
            torch_dist.create_process_groups()
        except BaseException:
            _C.shutdown()
            raise
    # After torch.distributed's init_process_group, which wraps sys.excepthook.
    _install_exit_handlers()


_shutdown_hooks = []


def register_shutdown_hook(fn):
    """fn() runs at every smp.shutdown, before the engine is released (smp.model
    registers the forgetting of its DistributedModel)."""
    _shutdown_hooks.append(fn)


def shutdown():
    """Runs the shutdown hooks (forgets the DistributedModel), destroys the
    torch process groups smp created and releases the engine.
    smp.init may be called again afterwards. A no-op when not initialized."""
    for fn in _shutdown_hooks:
        fn()
    try:
        torch_dist.destroy_process_groups()
    finally:
        if _C.is_initialized():
            _C.shutdown()


_exit_handlers_installed = False


def _shutdown_at_exit():
    try:
        shutdown()
    except Exception as e:  # the process is ending: report, do not raise
        print(f"smp: shutdown at exit failed: {e}", file=sys.stderr, flush=True)


def _write_to_terminal(text):
    """Writes text to the process's real stderr (file descriptor 2), whatever
    sys.stderr points at: torch.distributed's excepthook swaps sys.stderr for a
    buffer while it calls the hook it wrapped, and a process that ends with
    os._exit never prints that buffer."""
    data = text.encode("utf-8", "replace")
    while data:
        try:
            n = os.write(2, data)
        except InterruptedError:
            continue
        except OSError:
            return
        data = data[n:]


def _is_plain_printer(hook):
    """True for hooks that only print the traceback (Python's default and
    torch.distributed's rank-prefixing wrapper): the abort hook prints it itself."""
    if hook is sys.__excepthook__:
        return True
    return (getattr(hook, "__name__", "") == "_distributed_excepthook"
            and getattr(hook, "__module__", "") == "torch.distributed.distributed_c10d")


def _abort_on_uncaught_exception(hook):
    def excepthook(exc_type, exc, tb):
        if not (_C.is_initialized() and _C.size() > 1):
            hook(exc_type, exc, tb)
            return
        if not _is_plain_printer(hook):
            try:  # a user's hook (logging, error reporting) still runs
                hook(exc_type, exc, tb)
            except BaseException:  # noqa: BLE001 (the job ends below either way)
                pass
        r, n = _C.rank(), _C.size()
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        prefix = f"[smp rank {r}] "
        lines = "".join(prefix + line for line in text.splitlines(keepends=True))
        if not lines.endswith("\n"):
            lines += "\n"
        # Leaving without MPI_Finalize makes mpirun end the whole job (torchrun
        # ends the other workers when one exits non-zero), so a failing rank
        # does not leave its peers blocked in a collective.
        lines += (f"{prefix}smp: rank {r} of {n} is ending the job after an uncaught "
                  f"{exc_type.__name__} (set SMP_ABORT_ON_EXCEPTION=0 to let it exit "
                  "normally)\n")
        for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001 (a closed or replaced stream)
                pass
        _write_to_terminal(lines)
        os._exit(1)

    excepthook._smp_abort_hook = True
    return excepthook


def _install_abort_hook():
    """Puts the abort hook outermost in sys.excepthook (again after
    torch.distributed wrapped it). Under mpirun and torchrun only."""
    if os.environ.get("SMP_ABORT_ON_EXCEPTION", "1") == "0":
        return
    if _C.launch_kind() not in ("mpi", "torchrun"):
        return
    if getattr(sys.excepthook, "_smp_abort_hook", False):
        return
    sys.excepthook = _abort_on_uncaught_exception(sys.excepthook)


def _install_exit_handlers():
    """Once per process: shut smp down at interpreter exit (an MPI job must
    finalize), and under mpirun or torchrun end the job when a rank dies of an
    uncaught exception, after printing its traceback, instead of leaving the
    others waiting for it."""
    global _exit_handlers_installed
    if not _exit_handlers_installed:
        _exit_handlers_installed = True
        atexit.register(_shutdown_at_exit)
    _install_abort_hook()


def config():
    """The resolved config of the running job, a dict with every key."""
    return _C.config()


def _members(group):
    return list(_C.group_members(group))


def get_world_group():
    """World ranks of all processes: [0, 1, ..., size() - 1]."""
    return _members(CommGroup.WORLD)


def get_pp_group():
    """World ranks of this process's pipeline group, ordered by pp_rank."""
    return _members(CommGroup.PP_GROUP)


def get_tp_group():
    """World ranks of this process's tensor-parallel group, ordered by tp_rank."""
    return _members(CommGroup.TP_GROUP)


def get_rdp_group():
    """World ranks of this process's reduced-data-parallel group, ordered by rdp_rank."""
    return _members(CommGroup.RDP_GROUP)


def get_dp_group():
    """World ranks of this process's data-parallel group (all tp and rdp ranks of
    this pipeline stage), ordered by dp_rank."""
    return _members(CommGroup.DP_GROUP)


def get_mp_group():
    """World ranks of this process's model replica, ordered by mp_rank."""
    return _members(CommGroup.MP_GROUP)
