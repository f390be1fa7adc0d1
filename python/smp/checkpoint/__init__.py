"""smp.save / smp.load and smp.save_checkpoint / smp.resume_from_checkpoint.

The file names are smp v1's (``<f>_<pp_rank>_<tp_rank>`` for partial files,
``<f>_<pp_rank>_<tp_rank>_<rdp_rank>`` with sharded optimizer state); every file
smp.save writes loads with stock ``torch.load(f, weights_only=True)``. A partial
save is collective among its participants and becomes visible only when all
of them wrote their part (docs/file_format.md, "Commit protocol").

    if smp.rdp_rank() == 0:
        smp.save({"model": model.local_state_dict()}, "/ckpt/model.pt", partial=True)
    state = smp.load("/ckpt/model.pt", partial=True)

Asynchronous saves (``smp.save(..., async_save=True)``, ``smp.async_save``,
``smp.save_checkpoint(..., async_save=True)``) return an AsyncSaveHandle once
the state is snapshotted; the next save, smp.load, smp.shutdown and process
exit wait for the save in flight, and its error surfaces there (once).
"""

import atexit
import logging
import os
import re
import shutil
import time

import torch

from smp import _C, _reshard, _runtime, _state
from smp._C import CheckpointError, CommGroup, UnsafeLoadError
from smp._objects import allgather, barrier
from smp.optimizer import DistributedOptimizer

logger = logging.getLogger("smp.checkpoint")


#: Stats of the last smp.save / smp.load on this rank (bytes, seconds, GB/s, phases).
last_save_stats = None
last_load_stats = None


class AsyncSaveHandle:
    """What an asynchronous save returns: wait() blocks until the files are
    written and committed and returns the stats dict (raising the background
    error, which names the file and the rank, once); done() polls."""

    def __init__(self, handle=None, stats=None):
        self._handle = handle
        self._stats = stats

    def done(self):
        return self._handle is None or self._handle.done()

    def wait(self):
        global last_save_stats
        if self._stats is None:
            self._stats = self._handle.wait()
            last_save_stats = self._stats
        return self._stats

    @property
    def snapshot_seconds(self):
        """Seconds the caller was stalled (the snapshot)."""
        return self._handle.snapshot_seconds if self._handle is not None else 0.0


def wait_for_pending_saves():
    """Waits for the asynchronous save in flight, if any; raises its error
    (smp.CheckpointError naming the file and the rank) when it failed and
    nobody was told yet."""
    _C.ckpt_wait_pending()


_exit_hook_installed = False


def _wait_at_exit():
    try:
        _C.ckpt_wait_pending()
    except Exception as e:  # the process is ending: report, do not raise
        import sys
        print(f"smp: {e}", file=sys.stderr, flush=True)


def _wait_at_shutdown():
    try:
        _C.ckpt_wait_pending()
    except Exception as e:  # report; smp.shutdown must still release the engine
        logger.error("%s", e)


_runtime.register_shutdown_hook(_wait_at_shutdown)


def _start_async(jobs, then=None):
    """jobs: [(obj, f, partial, v3, suffix, timeout, shards)]. An AsyncSaveHandle,
    or None when an object needs torch.save semantics (nothing was saved)."""
    global _exit_hook_installed
    if not _exit_hook_installed:
        # After smp.init's own exit handler: atexit runs this one first.
        atexit.register(_wait_at_exit)
        _exit_hook_installed = True
    h = _C.ckpt_async_save([(o, f, p, v3, sfx, t, True, sh) for o, f, p, v3, sfx, t, sh in jobs],
                           then=then)
    if isinstance(h, tuple):
        i, where, what = h
        logger.warning(
            "smp.save('%s', async_save=True): %s at key '%s' is not a tensor, container or "
            "primitive; saving synchronously with torch.save semantics", jobs[i][1], what, where)
        return None
    return AsyncSaveHandle(h)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_v3():
    if not _C.is_initialized():
        return False
    return bool(_C.config().get("shard_optimizer_state", False))


def save(obj, f, partial=True, v3=None, pickle_module=None, pickle_protocol=2, *,
         timeout=None, async_save=False, _suffix=""):
    """Saves `obj` like torch.save, under smp's names.

    partial=True: collective among the participants (the caller's MP_GROUP, or
    with v3 every rank); each writes ``<f>_<pp>_<tp>`` (v3: ``<f>_<pp>_<tp>_<rdp>``)
    and smp.save returns only when the whole checkpoint is complete. Callers
    with rdp_rank() > 0 hold replicas and write nothing (without v3).
    partial=False: the caller writes `f` (atomically).

    v3: None uses the config's shard_optimizer_state. Objects smp's format
    does not hold (numpy arrays, user classes, torch.Size, ...) are written with
    torch.save semantics under the same protocol, with a warning naming the
    first such key; loading those needs weights_only=False or torch.load's
    weights_only allowlist. `pickle_module` (anything but the standard pickle)
    forces that path too. `timeout`: seconds to wait for the other participants
    (default SMP_CHECKPOINT_TIMEOUT or 60). Returns the stats dict.

    async_save=True: returns an AsyncSaveHandle as soon as every tensor is
    copied into the pinned snapshot arena (training may then change the
    parameters; the file holds the values at the call); the file is written
    and committed in a background thread. Waits first for the asynchronous
    save still in flight, and raises its error if it failed.
    """
    global last_save_stats
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(f"smp.save: f must be a path (str or os.PathLike), got {type(f).__name__}; "
                        "smp.save writes one file per model-parallel rank, so it needs a name")
    f = os.fspath(f)
    if v3 is None:
        v3 = _default_v3() if partial else False
    _C.ckpt_wait_pending()  # one save at a time; a background error surfaces here
    stats = None
    if async_save and (pickle_module is None or pickle_module.__name__ == "pickle"):
        shards = _reshard.shard_records(obj) if partial else None
        handle = _start_async([(obj, f, partial, bool(v3), _suffix, timeout, shards)])
        if handle is not None:
            return handle
    if pickle_module is None or pickle_module.__name__ == "pickle":
        # ---- resharding: shard records of the state dicts in obj (smp/_reshard.py) ----
        shards = _reshard.shard_records(obj) if partial else None
        # ---- end resharding ----
        stats = _C.ckpt_save(obj, f, partial=partial, v3=bool(v3), suffix=_suffix, timeout=timeout,
                             shards=shards)
        if isinstance(stats, tuple):
            where, what = stats
            logger.warning(
                "smp.save('%s'): %s at key '%s' is not a tensor, container or primitive; "
                "writing this file with torch.save semantics (loading it needs "
                "smp.load(..., weights_only=False) unless torch.load's weights_only allows it)",
                f, what, where)
            stats = None
    if stats is None:
        stats = _save_with_torch(obj, f, partial, bool(v3), _suffix, timeout,
                                 pickle_module, pickle_protocol)
    last_save_stats = stats
    return AsyncSaveHandle(stats=stats) if async_save else stats


def async_save(obj, f, partial=True, v3=None, *, timeout=None):
    """smp.save(obj, f, partial, v3, async_save=True): returns an AsyncSaveHandle
    (wait() / done()) once the state is snapshotted."""
    return save(obj, f, partial=partial, v3=v3, timeout=timeout, async_save=True)


def _save_with_torch(obj, f, partial, v3, suffix, timeout, pickle_module, pickle_protocol):
    session = _C.SaveSession(f, partial=partial, v3=v3, suffix=suffix, timeout=timeout)
    if session.skipped:
        return session.commit(0)
    tmp = session.temporary_path
    try:
        t0 = time.perf_counter()
        kwargs = {"pickle_protocol": pickle_protocol}
        if pickle_module is not None:
            kwargs["pickle_module"] = pickle_module
        torch.save(obj, tmp, **kwargs)
        t1 = time.perf_counter()
        _fsync_file(tmp)
        t2 = time.perf_counter()
        size = os.path.getsize(tmp)
    except BaseException as e:
        session.abort(f"rank {_C.rank() if _C.is_initialized() else 0} could not write "
                      f"'{tmp}' with torch.save: {type(e).__name__}: {e}")
        raise
    return session.commit(size, write_seconds=t1 - t0, fsync_seconds=t2 - t1)


def _map_tensor(t, map_location):
    if map_location is None:
        return t
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        storage = map_location(t.untyped_storage(), "cpu")
        if storage is None:
            return t
        out = torch.empty(0, dtype=t.dtype, device=storage.device)
        out.set_(storage, t.storage_offset(), t.size(), t.stride())
        out.requires_grad_(t.requires_grad)
        return out
    if isinstance(map_location, dict):
        target = map_location.get("cpu", "cpu")
    else:
        target = map_location
    target = torch.device(target)
    return t if target.type == "cpu" else t.to(target)


def _apply_map_location(obj, map_location, memo):
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = _map_tensor(obj, map_location)
        return memo[key]
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _apply_map_location(obj[k], map_location, memo)
        return obj
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            obj[i] = _apply_map_location(x, map_location, memo)
        return obj
    if isinstance(obj, tuple):
        return type(obj)(_apply_map_location(x, map_location, memo) for x in obj)
    return obj


def _numpy_safe_globals():
    """numpy's scalar, array and dtype reconstructors: safe for a restricted
    unpickler (an object array's items go through the same unpickler)."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [c for c in vars(dtypes).values() if isinstance(c, type)]
    return out


def _unsafe_load_switch():
    v = os.environ.get("SMP_UNSAFE_LOAD", "").strip().lower()
    return v not in ("", "0", "false", "no", "off")


def _timed_torch_load(path, stats, **kwargs):
    """torch.load(path, **kwargs), its time added to the load's `stats`."""
    t0 = time.perf_counter()
    obj = torch.load(path, **kwargs)
    stats["deserialize_seconds"] = time.perf_counter() - t0
    stats["seconds"] = stats["open_seconds"] + stats["deserialize_seconds"]
    return obj


def _load_resharded(f, map_location):
    """smp.load's resharding path (smp/_reshard.py); sets last_load_stats."""
    global last_load_stats
    obj, stats = _reshard.load_resharded(f)
    last_load_stats = stats
    return _apply_map_location(obj, map_location, {})


def load(f, partial=True, map_location=None, weights_only=None, *, verify_checksums=True,
         back_compat=False, pickle_module=None, **pickle_load_args):
    """Loads what smp.save wrote (or torch.save under smp's names).

    partial=True: this rank's part, ``<f>_<pp>_<tp>_<rdp>`` or ``<f>_<pp>_<tp>``
    (also with ".pt" after the ranks, and with f's ".pt" added or removed),
    checked against the manifest: an incomplete or mixed checkpoint or a missing
    part raise smp.CheckpointError. A checkpoint saved on another layout (pp/tp
    degrees; rdp degree with sharded optimizer state; owner-only optimizer
    state loaded without sharding) is resharded: the result is this rank's
    state for the current smp.DistributedModel / DistributedOptimizer, read by
    byte ranges from the parts that hold it (docs/api.md, "Resharding").
    weights_only=True (the default) never runs code from the file: tensors,
    containers, primitives, numpy scalars and arrays, and what torch.load's
    own allow-list admits (torch.serialization.add_safe_globals or the
    safe_globals context manager) load; anything else is refused with
    smp.CheckpointError naming the file and the global. weights_only=False,
    or the environment variable SMP_UNSAFE_LOAD=1 when weights_only is not
    given (for smp v1 scripts, unchanged, that load trusted files holding
    their own classes), opts in to full unpickling (torch.load, with
    pickle_module and pickle_load_args passed on). map_location
    as torch.load's: None/"cpu" (tensors load on the CPU), a device, a dict
    {"cpu": device}, or a callable (storage, "cpu") -> storage.
    """
    global last_load_stats
    del back_compat  # smp v1's old names are among the candidates already
    f = os.fspath(f)
    _C.ckpt_wait_pending()  # read what this process saved last
    if weights_only is None:
        weights_only = not _unsafe_load_switch()
    if not weights_only:
        path, stats = _C.ckpt_resolve(f, partial=partial)
        if pickle_module is not None:
            pickle_load_args["pickle_module"] = pickle_module
        obj = _timed_torch_load(path, stats, map_location=map_location, weights_only=False,
                                **pickle_load_args)
        last_load_stats = stats
        return obj
    if partial and _reshard.layout_differs(f):  # saved on another layout (smp/_reshard.py)
        return _load_resharded(f, map_location)
    device = _direct_device(map_location)
    try:
        obj, stats = _C.ckpt_load(f, partial=partial, verify_checksums=verify_checksums,
                                  device=device)
    except UnsafeLoadError as e:
        # Not plain data: torch's own safe unpickler may still allow it
        # (torch.Size, dtypes, ...); it never runs code either.
        path, stats = _C.ckpt_resolve(f, partial=partial)
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = _timed_torch_load(path, stats, map_location=map_location,
                                        weights_only=True)
        except Exception as te:  # torch raises UnpicklingError for refused globals
            why = next((ln.strip() for ln in str(te).splitlines()
                        if "Unsupported global" in ln), None)
            why = why or (str(te).splitlines()[0] if str(te) else type(te).__name__)
            raise CheckpointError(
                f"smp.load('{f}') refused '{path}': {e}\ntorch.load(weights_only=True) refused it "
                f"too: {why}\n"
                "To load it safely, allow the classes it names with "
                "torch.serialization.add_safe_globals([...]) (or the "
                "torch.serialization.safe_globals([...]) context manager) before smp.load. "
                "If you trust this file, load it with smp.load(..., weights_only=False), or set "
                "SMP_UNSAFE_LOAD=1 in the job's environment (no script change)") from None
        last_load_stats = stats
        return obj
    if partial and _reshard.holds_partial_owned_state(obj):
        # sharded optimizer state saved per owner, loaded unsharded
        return _load_resharded(f, map_location)
    t0 = time.perf_counter()
    if device is None:
        obj = _apply_map_location(obj, map_location, {})
    stats["deserialize_seconds"] += time.perf_counter() - t0
    last_load_stats = stats
    return obj


def _direct_device(map_location):
    """The device the engine loads tensors straight onto (a CUDA device given
    as a str or torch.device, or {"cpu": device}); None: load on the CPU and
    map afterwards."""
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu") if set(map_location) == {"cpu"} else None
    if isinstance(map_location, (str, torch.device)):
        try:
            d = torch.device(map_location)
        except (RuntimeError, TypeError):
            return None
        if d.type == "cuda" and torch.cuda.is_available():
            if d.index is None:
                d = torch.device("cuda", torch.cuda.current_device())
            return str(d)
    return None


# ---- save_checkpoint / resume_from_checkpoint -----------------------------------

def _check_tag(tag):
    if not isinstance(tag, str) or not tag:
        raise CheckpointError(f"smp.save_checkpoint: tag must be a non-empty str, got {tag!r}")
    if "/" in tag:
        raise CheckpointError(f"smp.save_checkpoint: tag {tag!r} contains '/'; use a plain name "
                              "such as the step number")
    tags = allgather(tag, CommGroup.WORLD)
    if any(t != tags[0] for t in tags):
        by_tag = {}
        for r, t in enumerate(tags):
            by_tag.setdefault(t, []).append(r)
        detail = "; ".join(f"ranks {rs}: {t!r}" for t, rs in by_tag.items())
        raise CheckpointError(
            f"smp.save_checkpoint: the tag must be the same on every rank, got {detail}; "
            "derive it from a value every rank shares (the step counter)")


def _layout():
    return {
        "world_size": _C.size(), "pp_size": _C.pp_size(), "tp_size": _C.tp_size(),
        "rdp_size": _C.rdp_size(), "smp_version": _C.version(),
    }


def _update_newest(path, folder_name, num_kept_partial_checkpoints):
    """Rank 0, once the partial checkpoint is complete: appends it to path/newest
    and removes the checkpoints beyond num_kept_partial_checkpoints."""
    newest = os.path.join(path, "newest")
    lines = []
    if os.path.isfile(newest):
        with open(newest) as fd:
            lines = [ln.strip() for ln in fd if ln.strip()]
    lines = [ln for ln in lines if ln != folder_name] + [folder_name]
    removed = []
    if num_kept_partial_checkpoints is not None:
        while len(lines) > num_kept_partial_checkpoints:
            removed.append(lines.pop(0))
    _C.ckpt_atomic_write(newest, "".join(ln + "\n" for ln in lines))
    for old in removed:
        old_dir = os.path.join(path, old)
        if os.path.isdir(old_dir):
            shutil.rmtree(old_dir)


def _commit_partial_folder(staging, folder):
    """Rank 0, once every save in the staging folder committed: the staging
    folder becomes `folder` in one step (the previous one, if any, is removed)."""
    old = _C.ckpt_replace_directory(staging, folder, f"{staging}.old")
    if old:
        shutil.rmtree(old, ignore_errors=True)


_ABANDONED = re.compile(r".+_partial\.tmp-[0-9a-f]+(\.old)?$")


def clean_abandoned_checkpoints(path):
    """Removes what interrupted smp.save_checkpoint calls left in `path`: staging
    folders "<tag>_partial.tmp-<id>" (and their ".old" copies) whose lock file
    no live process holds, stale lock files and temporaries of `newest`.
    Returns the removed folder names.
    Called by rank 0 at the start of every partial save_checkpoint into `path`."""
    removed = []
    try:
        names = os.listdir(path)
    except OSError:
        return removed
    for name in sorted(names):
        full = os.path.join(path, name)
        if _ABANDONED.match(name) and os.path.isdir(full):
            lock = (full[:-len(".old")] if name.endswith(".old") else full) + ".smp_lock"
            if _C.ckpt_lock_is_held(lock):
                continue  # a live save (this job's async one, or another job's)
            shutil.rmtree(full, ignore_errors=True)
            removed.append(name)
        elif name.startswith("newest.tmp-"):  # `newest` is written by rank 0 of one job
            try:
                os.unlink(full)
            except OSError:
                pass
        elif name.endswith(".smp_lock") and _ABANDONED.match(name[:-len(".smp_lock")]):
            if not os.path.isdir(full[:-len(".smp_lock")]) and not _C.ckpt_lock_is_held(full):
                try:
                    os.unlink(full)
                except OSError:
                    pass
    if removed:
        logger.info("smp.save_checkpoint: removed %d abandoned staging folder(s) in '%s': %s",
                    len(removed), path, ", ".join(removed))
    return removed


def _run_jobs(jobs):
    stats = None
    for obj, f, partial, v3, suffix in jobs:
        stats = save(obj, f, partial=partial, v3=v3, _suffix=suffix)
    return stats


def save_checkpoint(path, tag, partial=True, model=None, optimizer=None, user_content=None,
                    translate_if_full=True, num_kept_partial_checkpoints=None, *,
                    async_save=False):
    """Saves a training checkpoint (collective on all ranks), in smp v1's layout:

    partial:  path/<tag>_partial/model_<pp>_<tp>.pt             (rdp_rank 0 ranks)
              path/<tag>_partial/optimizer_states_<pp>_<tp>.pt  (rdp_rank 0 ranks), or
              path/<tag>_partial/optimizer_states_<pp>_<tp>_<rdp>.pt (every rank, with
              shard_optimizer_state)
              path/<tag>_partial/user_content.pt, smp_config.pt (rank 0)
              path/newest: "<tag>_partial" appended once the checkpoint is complete
    full:     path/<tag> (model.state_dict(gather_to_rank0=True), rank 0, gathered and
              written tensor by tensor by save_full_streaming for smp.DistributedModel),
              path/optimizer_<tag> (optimizer.state_dict(): full and unsharded, loadable
              by a plain torch optimizer), path/user_content_<tag>

    model needs local_state_dict() / state_dict(gather_to_rank0=True) and the
    optimizer local_state_dict() / state_dict() (smp.DistributedModel and
    smp.DistributedOptimizer). num_kept_partial_checkpoints keeps only the
    newest N partial checkpoints listed in `newest`.

    async_save=True: returns an AsyncSaveHandle once this rank's state is
    snapshotted (the collectives that gather a full state dict run before);
    the files are written and committed in the background, and rank 0 appends
    the tag to `newest` when its saves are committed (which makes the whole
    checkpoint complete: rank 0 takes part in every save of it). The next
    save, smp.load, smp.shutdown and process exit wait for it.
    """
    if model is None and optimizer is None:
        logger.warning("smp.save_checkpoint: both model and optimizer are None; nothing saved")
        return AsyncSaveHandle(stats={}) if async_save else None
    if num_kept_partial_checkpoints is not None and num_kept_partial_checkpoints <= 0:
        logger.warning("smp.save_checkpoint: num_kept_partial_checkpoints=%s is not positive; "
                       "keeping every checkpoint", num_kept_partial_checkpoints)
        num_kept_partial_checkpoints = None
    _C.ckpt_wait_pending()  # a background error of the previous save surfaces here
    _check_tag(tag)
    path = os.fspath(path)
    sharded = _default_v3()
    jobs = []  # (obj, f, partial, v3, suffix), in the order every participant saves them
    finish = None
    if partial:
        folder_name = f"{tag}_partial"
        folder = os.path.join(path, folder_name)
        # Written into a staging folder "<tag>_partial.tmp-<id>" (locked by rank 0
        # while the save lives) and put under its name in one step once every
        # save in it committed: an earlier checkpoint of the same tag survives,
        # model and optimizer together, until the new one is complete.
        stage_lock = None
        staging = None
        if _C.rank() == 0:
            os.makedirs(path, exist_ok=True)
            clean_abandoned_checkpoints(path)
            staging = f"{folder}.tmp-{os.urandom(8).hex()}"
            stage_lock = _C.SaveLock()
            # The name is new: nothing else waits for this lock; a cleanup of
            # another save_checkpoint into `path` sees it held and skips the folder.
            stage_lock.acquire(staging + ".smp_lock", 60.0,
                               f"smp.save_checkpoint('{path}', '{tag}')")
            os.makedirs(staging)
        staging = allgather(staging, CommGroup.WORLD)[0]
        if model is not None and _C.rdp_rank() == 0:
            jobs.append((model.local_state_dict(), os.path.join(staging, "model"), True, False,
                         ".pt"))
        if optimizer is not None and (sharded or _C.rdp_rank() == 0):
            # Each rdp rank saves its own shard (v3), tensors where they are.
            osd = (optimizer.local_state_dict(cast_to_cpu=False, gather_if_shard=False)
                   if isinstance(optimizer, DistributedOptimizer) else optimizer.local_state_dict())
            jobs.append((osd, os.path.join(staging, "optimizer_states"), True, sharded, ".pt"))
        if _C.rank() == 0:
            if user_content is not None:
                jobs.append((user_content, os.path.join(staging, "user_content.pt"), False, False,
                             ""))
            cfg = dict(_C.config())
            cfg.update(_layout())
            jobs.append((cfg, os.path.join(staging, "smp_config.pt"), False, False, ""))
            keep = num_kept_partial_checkpoints

            def finish(staging=staging, lock=stage_lock):
                _commit_partial_folder(staging, folder)
                _update_newest(path, folder_name, keep)
                lock.release()
    else:
        os.makedirs(path, exist_ok=True)
        barrier()
        translate = translate_if_full and _state.state.module_manager.translate_functions
        if (model is not None and _C.rdp_rank() == 0 and not async_save and not translate
                and hasattr(model, "_net") and hasattr(model, "_is_local")):
            # smp.DistributedModel, nothing to translate (translate functions take
            # the whole dict): gathered and written tensor by tensor, bounded memory.
            save_full_streaming(model, os.path.join(path, tag),
                                extra=None if translate_if_full else {"_smp_is_partial": False})
        elif model is not None and _C.rdp_rank() == 0:
            if translate_if_full:
                sd = model.state_dict(gather_to_rank0=True)
            else:
                # smp's own names (no smp.state.module_manager.translate_functions)
                sd = model.state_dict(gather_to_rank0=True, translate=False)
                sd["_smp_is_partial"] = False
            if _C.rank() == 0:
                jobs.append((sd, os.path.join(path, tag), False, False, ""))
        if optimizer is not None:
            osd = optimizer.state_dict()
            if _C.pp_size() > 1 and isinstance(osd, dict) and isinstance(osd.get("state"), dict):
                # state_dict() holds this pipeline stage's entries (positions are
                # global, tensors full-sized): merge every stage's, so that the
                # full checkpoint has them all.
                state = {}
                for part in allgather(osd["state"], CommGroup.PP_GROUP):
                    state.update(part)
                osd = dict(osd, state=state, _smp_is_partial=False)
            if _C.rank() == 0:
                jobs.append((osd, os.path.join(path, f"optimizer_{tag}"), False, False, ""))
        if user_content is not None and _C.rank() == 0:
            jobs.append((user_content, os.path.join(path, f"user_content_{tag}"), False, False,
                         ""))
    if async_save:
        handle = _start_async(
            [(o, f, p, v3, sfx, None, _reshard.shard_records(o) if p else None)
             for o, f, p, v3, sfx in jobs], then=finish)
        if handle is not None:
            return handle
        stats = _run_jobs(jobs)  # an object needs torch.save semantics: synchronously
        if finish is not None:
            finish()
        return AsyncSaveHandle(stats=stats or {})
    try:
        _run_jobs(jobs)
    except BaseException:
        if partial and _C.rank() == 0:  # every participant raises too: drop the staging folder
            shutil.rmtree(staging, ignore_errors=True)
            stage_lock.release()
        raise
    barrier()
    if finish is not None:
        finish()
        barrier()
    elif partial:
        barrier()
    return None


def resume_from_checkpoint(path, tag=None, partial=True, strict=True, load_optimizer=True,
                           load_sharded_optimizer_state=True, translate_function=None,
                           model=None, optimizer=None):
    """Loads a checkpoint written by smp.save_checkpoint into `model` and
    `optimizer` (collective on all ranks) and returns its user_content (or None).

    model, optimizer: what to load into (anything with load_state_dict). None,
    the default, is smp v1's behaviour (whose signature has neither): this
    process's smp.DistributedModel and latest smp.DistributedOptimizer.

    load_sharded_optimizer_state: smp v1's switch for sharded data parallelism
    (which smp refuses at smp.init); accepted, without effect.
    translate_function: for a full checkpoint, fn(state_dict) -> state_dict
    applied to the model's state dict before it is loaded (e.g. to rename keys).

    tag=None (partial only) reads the last line of path/newest. A partial
    checkpoint loads with model.load_state_dict(sd, strict=strict,
    same_partition_load=True) when its manifests record this job's pp/tp
    degrees; on another layout smp.load reshards the model and optimizer state
    for this job's smp.DistributedModel / DistributedOptimizer (docs/api.md,
    "Resharding") and the model loads with same_partition_load=False; a full
    one with model.load_state_dict(sd, strict=strict).
    """
    # smp v1's default: this process's smp.DistributedModel / smp.DistributedOptimizer.
    model = model if model is not None else _state.current_model()
    optimizer = optimizer if optimizer is not None else _state.current_optimizer()
    path = os.fspath(path)
    if tag is None:
        if not partial:
            raise CheckpointError("smp.resume_from_checkpoint: a full checkpoint needs its tag; "
                                  "pass tag=...")
        newest = os.path.join(path, "newest")
        if not os.path.isfile(newest):
            raise CheckpointError(
                f"smp.resume_from_checkpoint: '{newest}' does not exist, so there is no newest "
                "checkpoint; pass tag=... or check the path")
        with open(newest) as fd:
            lines = [ln.strip() for ln in fd if ln.strip()]
        if not lines:
            raise CheckpointError(f"smp.resume_from_checkpoint: '{newest}' is empty; pass tag=...")
        folder_name = lines[-1]
    else:
        folder_name = f"{tag}_partial" if partial else tag
    if partial:
        folder = os.path.join(path, folder_name)
        if not os.path.isdir(folder):
            prefix = os.path.basename(folder) + ".tmp-"
            staged = sorted(n for n in (os.listdir(path) if os.path.isdir(path) else ())
                            if n.startswith(prefix))
            if staged:
                raise CheckpointError(
                    f"smp.resume_from_checkpoint: checkpoint folder '{folder}' does not exist: "
                    f"its save was interrupted before it completed (only its staging folder "
                    f"{', '.join(repr(os.path.join(path, n)) for n in staged)} exists, which "
                    "the next save_checkpoint removes); load an earlier tag")
            raise CheckpointError(f"smp.resume_from_checkpoint: checkpoint folder '{folder}' "
                                  "does not exist; check path and tag")
        # The saved layout is checked once, against the manifest, by smp.load
        # (src/checkpoint/load.cc), which reshards a checkpoint of another layout
        # and marks the dict; smp_config.pt is written for smp v1 and read by nothing.
        if model is not None:
            sd = load(os.path.join(folder, "model"), partial=True)
            model.load_state_dict(sd, strict=strict,
                                  same_partition_load=_reshard.RESHARDED_KEY not in sd)
        if load_optimizer and optimizer is not None:
            osd = load(os.path.join(folder, "optimizer_states"), partial=True)
            optimizer.load_state_dict(osd)
        uc = os.path.join(folder, "user_content.pt")
    else:
        if model is not None:
            sd = load(os.path.join(path, folder_name), partial=False)
            if translate_function is not None:
                sd = translate_function(sd)
            sd.pop("_smp_is_partial", None)
            model.load_state_dict(sd, strict=strict)
        opt_file = os.path.join(path, f"optimizer_{folder_name}")
        if load_optimizer and optimizer is not None and os.path.isfile(opt_file):
            optimizer.load_state_dict(load(opt_file, partial=False))
        uc = os.path.join(path, f"user_content_{folder_name}")
    user_content = load(uc, partial=False) if os.path.isfile(uc) else None
    barrier()
    return user_content


# ---- offline tools: smp-checkpoint (smp/checkpoint/cli.py, docs/tools.md) ----------
from smp.checkpoint import tools  # noqa: E402
from smp.checkpoint.tools import reshard_offline  # noqa: E402,F401
from smp.checkpoint.streaming import save_full_streaming  # noqa: E402,F401
