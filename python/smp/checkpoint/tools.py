"""Offline checkpoint tools (the smp-checkpoint command, docs/tools.md): inspect,
verify, consolidate, reshard, export and diff checkpoints on one machine, with
no GPU and no running job.

Everything about the files goes through the engine (smp._C): the manifest is
parsed and checked by smp::ckpt::read_manifest, each part's ZIP directory and
index by smp::ckpt::Reader (CheckpointFile), record CRCs by
Reader::verify_records, global tensors are assembled from the parts by the
resharding planner (ReshardSource, byte ranges only) and files are written by
smp::ckpt::write_file_streaming, one tensor in memory at a time. The object
structure around the tensors (keys, param groups, user entries) comes from
torch.load(mmap=True, weights_only=True), which maps but never reads tensor data.

    from smp.checkpoint import tools
    tools.consolidate("/ckpt/model.pt", "/out/full.pt")
    tools.reshard_offline("/ckpt/model.pt", "/ckpt2/model.pt", pp=1, tp=4)
"""

import collections
import json
import os
import secrets
import shutil
import time

import torch

from smp import _C
from smp._C import CheckpointError

MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"
MANIFEST_SUFFIX = ".smp_manifest.json"
NAMES_KEY = "smp.tensor_names"


# ---- small helpers ----------------------------------------------------------------

def human(n):
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def parse_size(text):
    """'5GB', '500MiB', '1000' -> bytes (K/M/G/T: powers of 1000; Ki/Mi/Gi/Ti: of 1024)."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        return int(float(num) * mult)
    except ValueError:
        raise CheckpointError(f"size '{text}' is not a size; write e.g. 5GB, 500MiB or 1000000")


def _progress(total, desc, unit="B"):
    """A tqdm bar, silent when stderr is not a terminal (or tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:  # optional: no bars without it
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024, disable=None, leave=False)


def _rss_bytes():
    """Resident set size of this process (Linux), or 0 when unknown."""
    try:
        with open("/proc/self/statm") as fd:
            return int(fd.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Peak:
    """Tracks the peak RSS growth over a baseline while tensors stream through."""

    def __init__(self):
        self.base = _rss_bytes()
        self.peak = 0
        self.largest = 0

    def sample(self):
        self.peak = max(self.peak, _rss_bytes() - self.base)

    def report(self):
        return {"peak_rss_growth": self.peak, "largest_tensor": self.largest,
                "bound": 2 * self.largest}


def _dtype(name):
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype '{name}' in a checkpoint index")
    return dt


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _local_shape(glob, split, n, i):
    shape = list(glob)
    if split is not None and n > 1:
        base, rem = divmod(glob[split], n)
        shape[split] = base + (1 if i < rem else 0)
    return shape


def _placeholder(dtype, shape):
    """A tensor of `shape` that owns one element: what write_file_streaming
    lays out before the producer gives the bytes."""
    return torch.empty((), dtype=dtype).expand(*shape) if shape else torch.empty((), dtype=dtype)


def _is_model_sd(x):
    return isinstance(x, dict) and x.get("_smp_is_partial") is True and \
        "_smp_param_names" not in x


def _is_optimizer_sd(x):
    return isinstance(x, dict) and "_smp_param_names" in x and "state" in x and \
        "param_groups" in x


def _at(obj, path):
    for k in path:
        if isinstance(obj, dict):
            obj = obj[k] if k in obj else {str(kk): vv for kk, vv in obj.items()}[k]
        else:
            obj = obj[int(k)]
    return obj


# ---- opening a checkpoint ---------------------------------------------------------

def _find_manifest(path):
    """The manifest of `path` (a manifest, the name given to smp.save, that name
    with .pt added or removed), or None."""
    path = os.fspath(path)
    if path.endswith(MANIFEST_SUFFIX) and os.path.isfile(path):
        return path
    cands = [path + MANIFEST_SUFFIX]
    if path.endswith(".pt"):
        cands.append(path[:-3] + MANIFEST_SUFFIX)
    else:
        cands.append(path + ".pt" + MANIFEST_SUFFIX)
    for c in cands:
        if os.path.isfile(c):
            return c
    return None


def checkpoints_in(path):
    """The checkpoints a path names: itself, or for a folder (a save_checkpoint
    `<tag>_partial` folder) each partial checkpoint in it (by the name given to
    smp.save) and each other checkpoint file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [path]
    names = sorted(os.listdir(path))
    out, parts = [], set()
    for n in names:
        if n.endswith(MANIFEST_SUFFIX):
            ck = Checkpoint(os.path.join(path, n))
            parts.update(p["name"] for p in ck.parts)
            out.append(os.path.join(path, n[: -len(MANIFEST_SUFFIX)]))
    for n in names:
        full = os.path.join(path, n)
        if (os.path.isfile(full) and n not in parts and not n.endswith(MANIFEST_SUFFIX)
                and ".tmp-" not in n and n != "newest"):
            out.append(full)
    if not out:
        raise CheckpointError(f"folder '{path}' holds no checkpoint (no '*{MANIFEST_SUFFIX}' "
                              "and no files)")
    return out


class Checkpoint:
    """A checkpoint on disk: a partial one (manifest + parts) or one file.

    Attributes: path, manifest_path (None for one file), manifest (dict or
    None), parts ([{"name", "path", "pp_rank", "tp_rank", "rdp_rank", "bytes",
    "smp_index"}]).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.manifest_path = _find_manifest(self.path)
        self.manifest = None
        if self.manifest_path is not None:
            text = _C.ckpt_read_manifest(self.manifest_path)  # the engine checks it
            self.manifest = json.loads(text)
            d = os.path.dirname(self.manifest_path)
            self.parts = [dict(f, path=os.path.join(d, f["name"])) for f in self.manifest["files"]]
            self.base = self.manifest_path[: -len(MANIFEST_SUFFIX)]
        elif os.path.isfile(self.path):
            self.parts = [{"name": os.path.basename(self.path), "path": self.path, "pp_rank": None,
                           "tp_rank": None, "rdp_rank": None,
                           "bytes": os.path.getsize(self.path), "smp_index": None}]
            self.base = self.path
        else:
            near = sorted(n for n in os.listdir(os.path.dirname(self.path) or ".")
                          if n.startswith(os.path.basename(self.path)))[:8] \
                if os.path.isdir(os.path.dirname(self.path) or ".") else []
            raise CheckpointError(
                f"'{self.path}' is neither a checkpoint file nor the name of a partial "
                f"checkpoint (no '{self.path}{MANIFEST_SUFFIX}')"
                + (f"; files with that prefix: {', '.join(near)}" if near else "")
                + ". Pass the name given to smp.save (e.g. /ckpt/model.pt), its manifest, "
                "or one file")

    @property
    def partial(self):
        return self.manifest is not None

    def layout(self):
        m = self.manifest or {}
        return {k: m.get(k) for k in ("pp_size", "tp_size", "rdp_size", "world_size", "v3")}

    def source(self):
        """The engine's ReshardSource (manifest + every part's index and names)."""
        if not self.partial:
            raise CheckpointError(f"'{self.path}' is one file, not a partial checkpoint")
        return _C.ReshardSource(self.base)

    def primary(self):
        """Index of the part of pp_rank 0, tp_rank 0 (lowest rdp)."""
        order = sorted(range(len(self.parts)), key=lambda i: (
            self.parts[i]["pp_rank"], self.parts[i]["tp_rank"], self.parts[i]["rdp_rank"] or 0))
        return order[0]


def _open_file(path):
    try:
        return _C.CheckpointFile(path)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot open '{path}': {e}")


def _index(cf):
    return json.loads(cf.index_json())


def _names(index):
    """{joined key path: full name} from an index's info."""
    text = index.get("info", {}).get(NAMES_KEY)
    if not text:
        return {}
    return {"/".join(t["path"]): t["name"] for t in json.loads(text)["tensors"]}


def _layout_text(spec, shape):
    if not spec or spec.get("num_shards", 1) <= 1 or spec.get("split_dim", -1) < 0:
        return "replicated"
    return f"split dim {spec['split_dim']} into {spec['num_shards']}"


# ---- inspect ------------------------------------------------------------------------

def inspect(path):
    """What a checkpoint holds, as a JSON-ready dict: layout, save id, time,
    smp version, completeness, parts, and every tensor (dtype, global shape,
    shard layout, bytes)."""
    ck = Checkpoint(path)
    out = {"path": ck.path, "manifest": ck.manifest_path, "partial": ck.partial}
    if ck.partial:
        m = ck.manifest
        out.update({k: m.get(k) for k in ("pp_size", "tp_size", "rdp_size", "world_size",
                                          "save_id", "smp_version", "suffix")})
        out["sharded_optimizer_state"] = bool(m.get("v3"))
        out["by_name"] = bool(m.get("by_name", False))
        out["time"] = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                    time.gmtime(os.path.getmtime(ck.manifest_path)))
    else:
        out["time"] = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                    time.gmtime(os.path.getmtime(ck.path)))
    parts, tensors, missing = [], collections.OrderedDict(), []
    for p in ck.parts:
        entry = {k: p[k] for k in ("name", "pp_rank", "tp_rank", "rdp_rank", "bytes")}
        if not os.path.isfile(p["path"]):
            entry["status"] = "missing"
            missing.append(p["name"])
            parts.append(entry)
            continue
        try:
            cf = _open_file(p["path"])
            ix = _index(cf)
        except CheckpointError as e:
            entry["status"] = f"unreadable: {e}"
            missing.append(p["name"])
            parts.append(entry)
            continue
        info = ix.get("info", {})
        entry["status"] = "ok"
        entry["save_id"] = info.get("save_id")
        if ck.partial and p.get("smp_index") and info.get("save_id") != ck.manifest["save_id"]:
            entry["status"] = "save id differs from the manifest's"
            missing.append(p["name"])
        if not ck.partial:
            out["smp_version"] = ix.get("smp_version") or None
            out["save_id"] = info.get("save_id")
            out["has_smp_index"] = cf.has_index
        names = _names(ix)
        entry["tensors"] = len(ix["tensors"])
        parts.append(entry)
        for t in ix["tensors"]:
            joined = "/".join(t["path"])
            name = names.get(joined) or joined
            spec = t.get("shard")
            rec = tensors.get(name)
            if rec is None:
                glob = spec["global_shape"] if spec else t["shape"]
                rec = tensors[name] = {
                    "name": name, "dtype": t["dtype"], "global_shape": list(glob),
                    "layout": _layout_text(spec, t["shape"]),
                    "bytes": _numel(glob) * _element_size(t["dtype"]),
                    "stored_bytes": 0, "files": []}
            rec["stored_bytes"] += t["nbytes"]
            rec["files"].append(p["name"])
    out["parts"] = parts
    out["complete"] = not missing
    out["problems"] = [f"part '{n}' is missing or unreadable" for n in missing]
    out["tensors"] = list(tensors.values())
    out["total_bytes"] = sum(p["bytes"] or 0 for p in ck.parts)
    return out


_ELEMENT_SIZE = {}


def _element_size(dtype_name):
    if dtype_name not in _ELEMENT_SIZE:
        _ELEMENT_SIZE[dtype_name] = torch.empty((), dtype=_dtype(dtype_name)).element_size()
    return _ELEMENT_SIZE[dtype_name]


def format_inspect(d):
    """The text `smp-checkpoint inspect` prints."""
    lines = []
    if d["partial"]:
        lines.append(f"checkpoint '{d['path']}' (manifest '{d['manifest']}')")
        lines.append(f"  layout       pp {d['pp_size']} x tp {d['tp_size']} x rdp {d['rdp_size']} "
                     f"(world {d['world_size']}), optimizer state "
                     f"{'sharded (v3 parts)' if d['sharded_optimizer_state'] else 'not sharded'}"
                     + (", rewritten offline (parts hold tensors by name)" if d["by_name"] else ""))
        lines.append(f"  save id      {d['save_id']}")
    else:
        lines.append(f"checkpoint file '{d['path']}' ("
                     f"{'smp format' if d.get('has_smp_index') else 'torch.save format'})")
        if d.get("save_id"):
            lines.append(f"  save id      {d['save_id']}")
    lines.append(f"  written      {d['time']}")
    lines.append(f"  smp version  {d.get('smp_version') or 'unknown'}")
    lines.append(f"  complete     {'yes' if d['complete'] else 'NO: ' + '; '.join(d['problems'])}")
    lines.append(f"  files        {len(d['parts'])}, {human(d['total_bytes'])}")
    for p in d["parts"]:
        where = "" if p["pp_rank"] is None else \
            f"pp {p['pp_rank']} tp {p['tp_rank']}" + \
            ("" if p["rdp_rank"] is None else f" rdp {p['rdp_rank']}")
        lines.append(f"    {p['name']:<40} {where:<18} {human(p['bytes'] or 0):>10}  "
                     f"{p.get('tensors', '-')} tensors  {p['status']}")
    total = sum(t["bytes"] for t in d["tensors"])
    lines.append(f"  tensors      {len(d['tensors'])}, {human(total)} (global)")
    w = max([len(t["name"]) for t in d["tensors"]] + [4])
    lines.append(f"    {'name':<{w}}  {'dtype':<9} {'global shape':<16} {'layout':<20} {'size':>10}")
    for t in d["tensors"]:
        shape = "[" + ", ".join(map(str, t["global_shape"])) + "]"
        lines.append(f"    {t['name']:<{w}}  {t['dtype']:<9} {shape:<16} {t['layout']:<20} "
                     f"{human(t['bytes']):>10}")
    return "\n".join(lines)


# ---- verify -------------------------------------------------------------------------

def verify(path, progress=True):
    """Checks a checkpoint: every part present with its manifest size and save
    id, ZIP structure and index valid, every record's CRC-32, tensor names and
    global shapes consistent across parts, every shard of every split tensor
    present. Returns (ok, [problem, ...]); each problem names the file."""
    try:
        ck = Checkpoint(path)
    except CheckpointError as e:
        return False, [str(e)]
    problems = []
    present = [p for p in ck.parts if os.path.isfile(p["path"])]
    for p in ck.parts:
        if p not in present:
            problems.append(f"'{p['path']}': missing (listed in manifest '{ck.manifest_path}' "
                            f"for pp_rank {p['pp_rank']}, tp_rank {p['tp_rank']}"
                            + ("" if p["rdp_rank"] is None else f", rdp_rank {p['rdp_rank']}")
                            + ")")
    total = sum(os.path.getsize(p["path"]) for p in present)
    bar = _progress(total, "verify") if progress else _progress(0, "")
    shards = collections.defaultdict(dict)  # name -> {shard_index: (file, spec)}
    specs = {}
    done_before = 0
    for p in present:
        size = os.path.getsize(p["path"])
        if ck.partial and size != p["bytes"]:
            problems.append(f"'{p['path']}': {size} bytes but the manifest records {p['bytes']}")
        try:
            cf = _open_file(p["path"])
            ix = _index(cf)
        except CheckpointError as e:
            problems.append(str(e))
            done_before += size
            continue
        info = ix.get("info", {})
        if ck.partial and p.get("smp_index") and info.get("save_id") != ck.manifest["save_id"]:
            problems.append(f"'{p['path']}': save id '{info.get('save_id')}' but the manifest "
                            f"'{ck.manifest_path}' names '{ck.manifest['save_id']}' (mixed "
                            "checkpoint)")
        last = [0]

        def on_bytes(done, total_file, last=last):
            bar.update(done - last[0])
            last[0] = done
        try:
            problems += cf.verify_records(on_bytes if progress else None)
        except CheckpointError as e:
            problems.append(str(e))
        done_before += size
        try:
            names = _names(ix)
        except (ValueError, KeyError) as e:
            problems.append(f"'{p['path']}': the tensor names in its index are malformed ({e})")
            names = {}
        for t in ix["tensors"]:
            name = names.get("/".join(t["path"]))
            spec = t.get("shard")
            if name is None or spec is None:
                continue
            key = (spec["global_shape"], t["dtype"])
            if name in specs and specs[name][0] != key:
                problems.append(f"tensor '{name}': global shape {key[0]} {key[1]} in '{p['path']}' "
                                f"but {specs[name][0][0]} {specs[name][0][1]} in '{specs[name][1]}'")
            specs.setdefault(name, (key, p["path"]))
            if spec.get("num_shards", 1) > 1:
                shards[name][spec["shard_index"]] = (p["path"], spec)
    bar.close()
    if ck.partial and not problems:
        for name, got in shards.items():
            n = next(iter(got.values()))[1]["num_shards"]
            lost = sorted(set(range(n)) - set(got))
            if lost:
                problems.append(f"tensor '{name}': shards {lost} of {n} are in no file "
                                f"(present in: {', '.join(sorted({f for f, _ in got.values()}))})")
    return not problems, problems


# ---- reading global tensors -----------------------------------------------------------

class _Source:
    """Global tensors of a partial checkpoint by full name, read by byte range."""

    def __init__(self, ck, threads=4):
        self.ck = ck
        self.src = ck.source()
        self.threads = threads
        self.parts = self.src.parts
        self.where = collections.OrderedDict()  # name -> (part, key path) of its first copy
        order = sorted(range(len(self.parts)), key=lambda i: (
            self.parts[i]["pp_rank"], self.parts[i]["tp_rank"], max(self.parts[i]["rdp_rank"], 0)))
        self.order = order
        for p in order:
            for name, path in self.src.part_names(p).items():
                self.where.setdefault(name, (p, list(path)))
        self.primary = order[0]
        self._skeletons = {}

    def skeleton(self, part):
        if part not in self._skeletons:
            self._skeletons[part] = torch.load(self.parts[part]["file"], mmap=True,
                                               weights_only=True, map_location="cpu")
        return self._skeletons[part]

    def spec(self, name):
        s = self.src.saved_spec(name)
        if s is None:
            raise CheckpointError(f"tensor '{name}' is in no part of '{self.ck.path}'")
        return s

    def read(self, name, split=None, n=1, i=0):
        """The tensor `name`: whole (split None), or shard i of n along `split`."""
        s = self.spec(name)
        glob = list(s["global_shape"])
        out = torch.empty(_local_shape(glob, split, n, i), dtype=_dtype(s["dtype"]))
        self.src.load([(name, glob, split, n if split is not None else 1, i)], [out],
                      threads=self.threads)
        return out

    def model_names(self):
        return [k for k in self.where if k.startswith(MODEL_PREFIX)]

    def group_names(self):
        """Parameter names per param group, merged over the parts in stage order."""
        groups = None
        for p in self.order:
            osd = self._find_optimizer(self.skeleton(p))
            if osd is None:
                continue
            gn = osd["_smp_param_names"]
            if groups is None:
                groups = [list() for _ in gn]
            for g, names in enumerate(gn):
                for nm in names:
                    if nm not in groups[g]:
                        groups[g].append(nm)
        return groups or []

    @staticmethod
    def _find_optimizer(x):
        if _is_optimizer_sd(x):
            return x
        if isinstance(x, dict):
            for v in x.values():
                r = _Source._find_optimizer(v)
                if r is not None:
                    return r
        elif isinstance(x, (list, tuple)):
            for v in x:
                r = _Source._find_optimizer(v)
                if r is not None:
                    return r
        return None

    def param_state(self, param):
        """The per-parameter state dict (skeleton) of `param` from a part holding it."""
        if not hasattr(self, "_state_of"):
            self._state_of = {}
            for name, (part, path) in self.where.items():
                if name.startswith(OPTIMIZER_PREFIX):
                    n = name[len(OPTIMIZER_PREFIX):].rpartition("/")[0]
                    self._state_of.setdefault(n, (part, path[:-1]))
        where = self._state_of.get(param)
        return None if where is None else _at(self.skeleton(where[0]), where[1])


def _stream_write(obj, out, producers, info=None, shards=None, peak=None, desc="write",
                  fsync=True):
    """Writes obj whose tensor leaves are placeholders; producers maps each
    placeholder's data_ptr to a callable giving its tensor."""
    total = sum(p[1] for p in producers.values())
    bar = _progress(total, desc)

    def produce(placeholder):
        fn, nbytes = producers[placeholder.data_ptr()]
        t = fn()
        if peak is not None:
            peak.largest = max(peak.largest, t.numel() * t.element_size())
            peak.sample()
        bar.update(nbytes)
        return t
    try:
        stats = _C.ckpt_write_streaming(obj, out, produce, info=info or {}, shards=shards,
                                        fsync=fsync)
    finally:
        bar.close()
    if peak is not None:
        peak.sample()
    return stats


# ---- consolidate ----------------------------------------------------------------------

def consolidate(path, out, threads=4):
    """Writes a partial checkpoint as one full file: the saved object with
    every model state dict full (the unwrapped model's keys, loadable with
    strict=True) and every optimizer state dict full (torch's format, the
    parameters of all stages in order, plus "_smp_param_names"). Tensors are
    assembled and written one at a time. Returns stats, with the peak RSS
    growth and the largest tensor."""
    ck = Checkpoint(path)
    if not ck.partial:
        raise CheckpointError(f"'{ck.path}' is already one file (no manifest); consolidate takes "
                              "a partial checkpoint (the name given to smp.save(partial=True))")
    peak = _Peak()
    src = _Source(ck, threads=threads)
    producers = {}

    def leaf(name):
        s = src.spec(name)
        ph = _placeholder(_dtype(s["dtype"]), s["global_shape"])
        producers[ph.data_ptr()] = (lambda name=name: src.read(name),
                                    _numel(s["global_shape"]) * _element_size(s["dtype"]))
        return ph

    def copy_leaf(t):
        ph = _placeholder(t.dtype, list(t.shape))
        producers[ph.data_ptr()] = (lambda t=t: t.contiguous(), t.numel() * t.element_size())
        return ph

    def model_sd(sd):
        full = collections.OrderedDict()
        for name in src.model_names():
            full[name[len(MODEL_PREFIX):]] = leaf(name)
        for k, v in sd.items():
            if isinstance(k, str) and k.startswith("_smp_"):
                continue
            if k not in full and not torch.is_tensor(v):
                full[k] = v
        meta = getattr(sd, "_metadata", None)
        if meta is not None:
            full._metadata = meta
        return full

    def optimizer_sd(osd):
        groups = src.group_names()
        state, pgroups, index = {}, [], 0
        for g, names in enumerate(groups):
            idx = list(range(index, index + len(names)))
            index += len(names)
            hyper = {k: v for k, v in osd["param_groups"][g].items() if k != "params"}
            pgroups.append({**hyper, "params": idx})
            for i, n in zip(idx, names):
                st = src.param_state(n)
                if st is None:
                    continue
                state[i] = {k: (leaf(f"{OPTIMIZER_PREFIX}{n}/{k}")
                                if torch.is_tensor(v) else v) for k, v in st.items()}
        return {"state": state, "param_groups": pgroups, "_smp_param_names": groups}

    def build(x):
        if _is_optimizer_sd(x):
            return optimizer_sd(x)
        if _is_model_sd(x):
            return model_sd(x)
        if isinstance(x, dict):
            o = collections.OrderedDict() if isinstance(x, collections.OrderedDict) else {}
            for k, v in x.items():
                o[k] = build(v)
            if isinstance(x, collections.OrderedDict) and getattr(x, "_metadata", None) is not None:
                o._metadata = x._metadata
            return o
        if isinstance(x, list):
            return [build(v) for v in x]
        if isinstance(x, tuple):
            return tuple(build(v) for v in x)
        if torch.is_tensor(x):
            return copy_leaf(x)
        return x

    obj = build(src.skeleton(src.primary))
    t0 = time.perf_counter()
    stats = _stream_write(obj, os.fspath(out), producers, peak=peak, desc="consolidate",
                          info={"consolidated_from": ck.manifest_path,
                                "source_save_id": ck.manifest["save_id"]})
    stats["seconds"] = time.perf_counter() - t0
    stats.update(peak.report())
    return stats


# ---- reshard (offline) -----------------------------------------------------------------

def reshard_offline(src, dst, pp, tp, rdp=1, threads=4):
    """Rewrites partial checkpoint `src` for the layout pp x tp (x rdp) as `dst`
    (files `<dst>_<pp>_<tp><suffix>` and `<dst>.smp_manifest.json`), on one
    machine, one tensor shard in memory at a time.

    Each tensor split on the saving layout is split the same way into tp
    shards; replicated tensors stay whole. Pipeline stages are not known
    without the model, so parameters are spread over the pp parts in their
    order, balanced by bytes; the manifest is marked "by_name", which makes
    smp.load(dst, partial=True) read every rank's tensors by name (resharding
    path), on this layout or any other, exactly like the original. Optimizer
    state is written unsharded (v2 parts); a job with shard_optimizer_state
    reads its own parameters' state from them. `src` and `dst` may also be
    save_checkpoint folders (`<tag>_partial`): every checkpoint in it is
    rewritten and its other files copied. Returns stats.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    for name, v in (("pp", pp), ("tp", tp), ("rdp", rdp)):
        if not isinstance(v, int) or v < 1:
            raise CheckpointError(f"reshard: {name} must be a positive integer, got {v!r}")
    if os.path.isdir(src):
        manifests = sorted(n for n in os.listdir(src) if n.endswith(MANIFEST_SUFFIX))
        if not manifests:
            raise CheckpointError(f"'{src}' is a folder without '*{MANIFEST_SUFFIX}': not a "
                                  "partial checkpoint folder")
        os.makedirs(dst, exist_ok=True)
        stats = {"checkpoints": []}
        names = set()
        for m in manifests:
            base = m[: -len(MANIFEST_SUFFIX)]
            ck = Checkpoint(os.path.join(src, m))
            names.update(p["name"] for p in ck.parts)
            names.add(m)
            stats["checkpoints"].append(reshard_offline(os.path.join(src, base),
                                                        os.path.join(dst, base), pp, tp, rdp,
                                                        threads))
        for n in sorted(os.listdir(src)):
            if n not in names and ".tmp-" not in n and os.path.isfile(os.path.join(src, n)):
                shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
        return stats

    ck = Checkpoint(src)
    if not ck.partial:
        raise CheckpointError(f"'{ck.path}' is one file (no manifest); reshard takes a partial "
                              "checkpoint (the name given to smp.save(partial=True))")
    if _find_manifest(dst) is not None:
        raise CheckpointError(f"'{dst}' already holds a checkpoint ('{_find_manifest(dst)}'); "
                              "choose another name or remove it first")
    source = _Source(ck, threads=threads)
    suffix = ck.manifest.get("suffix", "")
    out_base = dst
    if suffix and out_base.endswith(suffix):
        out_base = out_base[: -len(suffix)]
    os.makedirs(os.path.dirname(os.path.abspath(out_base)), exist_ok=True)

    # Stage of each parameter: contiguous in model order, balanced by bytes.
    model_names = source.model_names()
    sizes = []
    for n in model_names:
        s = source.spec(n)
        sizes.append(_numel(s["global_shape"]) * _element_size(s["dtype"]))
    total = sum(sizes) or 1
    stage_of, acc = {}, 0
    for n, b in zip(model_names, sizes):
        stage_of[n[len(MODEL_PREFIX):]] = min(pp - 1, int(acc * pp // total))
        acc += b
    groups = source.group_names()
    prim = source.skeleton(source.primary)
    save_id = secrets.token_hex(8)
    files, peak = [], _Peak()
    t0 = time.perf_counter()
    for p_rank in range(pp):
        for t_rank in range(tp):
            producers, shards = {}, []

            def leaf(name, path, producers=producers, shards=shards, t_rank=t_rank):
                s = source.spec(name)
                glob = list(s["global_shape"])
                split = s["split_dim"] if tp > 1 else None
                n, i = (tp, t_rank) if split is not None else (1, 0)
                shape = _local_shape(glob, split, n, i)
                ph = _placeholder(_dtype(s["dtype"]), shape)
                producers[ph.data_ptr()] = (
                    lambda name=name, split=split, n=n, i=i: source.read(name, split, n, i),
                    _numel(shape) * _element_size(s["dtype"]))
                shards.append((list(path), name, glob, split, n, i))
                return ph

            def copy_leaf(t, producers=producers):
                ph = _placeholder(t.dtype, list(t.shape))
                producers[ph.data_ptr()] = (lambda t=t: t.contiguous(), t.numel() * t.element_size())
                return ph

            def model_sd(sd, path, p_rank=p_rank, leaf=leaf):
                out = collections.OrderedDict()
                for n in model_names:
                    k = n[len(MODEL_PREFIX):]
                    if stage_of[k] == p_rank:
                        out[k] = leaf(n, path + [k])
                for k, v in sd.items():
                    if k not in out and not torch.is_tensor(v):
                        out[k] = v
                out["_smp_is_partial"] = True
                meta = getattr(sd, "_metadata", None)
                if meta is not None:
                    out._metadata = meta
                return out

            def optimizer_sd(osd, path, p_rank=p_rank, leaf=leaf):
                state, pgroups, index = {}, [], 0
                specs = {}
                for p in source.order:
                    o = source._find_optimizer(source.skeleton(p))
                    if o is not None:
                        specs.update(o.get("_smp_shard_specs", {}))
                for g, names in enumerate(groups):
                    idx = list(range(index, index + len(names)))
                    index += len(names)
                    hyper = {k: v for k, v in osd["param_groups"][g].items() if k != "params"}
                    pgroups.append({**hyper, "params": idx})
                    for i, n in zip(idx, names):
                        if stage_of.get(n, 0) != p_rank:
                            continue
                        st = source.param_state(n)
                        if st is None:
                            continue
                        state[i] = {k: (leaf(f"{OPTIMIZER_PREFIX}{n}/{k}",
                                             path + ["state", str(i), k])
                                        if torch.is_tensor(v) else v) for k, v in st.items()}
                return {"state": state, "param_groups": pgroups, "_smp_param_names": groups,
                        "_smp_shard_specs": specs, "_smp_is_partial": True}

            def build(x, path, model_sd=model_sd, optimizer_sd=optimizer_sd, copy_leaf=copy_leaf):
                if _is_optimizer_sd(x):
                    return optimizer_sd(x, path)
                if _is_model_sd(x):
                    return model_sd(x, path)
                if isinstance(x, dict):
                    o = collections.OrderedDict() if isinstance(x, collections.OrderedDict) else {}
                    for k, v in x.items():
                        o[k] = build(v, path + [str(k)])
                    return o
                if isinstance(x, list):
                    return [build(v, path + [str(i)]) for i, v in enumerate(x)]
                if isinstance(x, tuple):
                    return tuple(build(v, path + [str(i)]) for i, v in enumerate(x))
                if torch.is_tensor(x):
                    return copy_leaf(x)
                return x

            obj = build(prim, [])
            name = f"{os.path.basename(out_base)}_{p_rank}_{t_rank}{suffix}"
            fpath = os.path.join(os.path.dirname(os.path.abspath(out_base)), name)
            info = {"save_id": save_id, "partial": "true", "v3": "false",
                    "pp_rank": str(p_rank), "tp_rank": str(t_rank),
                    "world_size": str(pp * tp * rdp), "pp_size": str(pp), "tp_size": str(tp),
                    "rdp_size": str(rdp),
                    "smp.resharded_offline_from": f"{ck.manifest_path} (save id "
                                                  f"{ck.manifest['save_id']})"}
            _stream_write(obj, fpath, producers, info=info, shards=shards or None, peak=peak,
                          desc=f"reshard {name}")
            files.append({"name": name, "pp_rank": p_rank, "tp_rank": t_rank, "rdp_rank": None,
                          "world_rank": p_rank * tp + t_rank, "bytes": os.path.getsize(fpath),
                          "smp_index": True})
    manifest = {"format": "smp.manifest", "format_version": 1, "smp_version": _C.version(),
                "save_id": save_id, "partial": True, "v3": False, "suffix": suffix,
                "world_size": pp * tp * rdp, "pp_size": pp, "tp_size": tp, "rdp_size": rdp,
                "by_name": True, "files": files}
    # The manifest last: its atomic rename is the commit point, as for smp.save.
    _C.ckpt_write_manifest(out_base + MANIFEST_SUFFIX, json.dumps(manifest))
    stats = {"files": [f["name"] for f in files], "bytes": sum(f["bytes"] for f in files),
             "seconds": time.perf_counter() - t0, "manifest": out_base + MANIFEST_SUFFIX}
    stats.update(peak.report())
    return stats


# ---- export (safetensors) ----------------------------------------------------------------

_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


def _catalogue(ck, src=None):
    """[(name, dtype name, global shape, read fn)] of a checkpoint's tensors:
    the named tensors of a partial checkpoint, or every tensor leaf of one file
    by its key path."""
    out = []
    if ck.partial:
        src = src or _Source(ck)
        for name in src.where:
            s = src.spec(name)
            out.append((name, s["dtype"], list(s["global_shape"]),
                        lambda name=name: src.read(name)))
    else:
        cf = _open_file(ck.path)
        ix = _index(cf)
        names = _names(ix)
        for i, t in enumerate(ix["tensors"]):
            joined = "/".join(t["path"])
            out.append((names.get(joined, joined), t["dtype"], list(t["shape"]),
                        lambda i=i, cf=cf: cf.read_tensor(i)))
    return out


def export_safetensors(path, out_dir, max_shard_size="5GB"):
    """Writes the model state of a checkpoint (partial, or one file) as
    Hugging Face-style safetensors shards `model-0000k-of-0000n.safetensors`
    plus `model.safetensors.index.json` in out_dir, one tensor in memory at a
    time. Keys are the model's state-dict keys (the "model/" names of a
    partial checkpoint; for one file, the leaves of its model state dict,
    else all its tensor leaves by key path). Returns stats."""
    ck = Checkpoint(path)
    limit = parse_size(max_shard_size)
    cat = _catalogue(ck)
    if ck.partial:
        items = [(n[len(MODEL_PREFIX):], d, s, fn) for n, d, s, fn in cat
                 if n.startswith(MODEL_PREFIX)]
    else:
        items = [(n.split("/", 1)[1] if "/" in n else n, d, s, fn) for n, d, s, fn in cat]
        if len({n for n, _, _, _ in items}) != len(items):
            items = list(cat)
    if not items:
        raise CheckpointError(f"'{ck.path}' holds no model tensors to export")
    for n, d, s, fn in items:
        if d not in _ST_DTYPES:
            raise CheckpointError(f"tensor '{n}' of '{ck.path}' has dtype {d}, which safetensors "
                                  "does not store")
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        nb = _numel(it[2]) * _element_size(it[1])
        if cur and cur_bytes + nb > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += nb
    shards.append(cur)
    os.makedirs(out_dir, exist_ok=True)
    weight_map, total, peak = {}, 0, _Peak()
    bar = _progress(sum(_numel(s) * _element_size(d) for _, d, s, _ in items), "export")
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for n, d, s, _ in shard:
            nb = _numel(s) * _element_size(d)
            header[n] = {"dtype": _ST_DTYPES[d], "shape": list(s), "data_offsets": [off, off + nb]}
            off += nb
        header["__metadata__"] = {"format": "pt"}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
        fpath = os.path.join(out_dir, fname)
        tmp = fpath + f".tmp-{os.getpid()}"
        with open(tmp, "wb") as fd:
            fd.write(len(hbytes).to_bytes(8, "little"))
            fd.write(hbytes)
            for n, d, s, fn in shard:
                t = fn().contiguous()
                peak.largest = max(peak.largest, t.numel() * t.element_size())
                peak.sample()
                fd.write(memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else b"")
                bar.update(t.numel() * t.element_size())
                weight_map[n] = fname
                del t
            fd.flush()
            os.fsync(fd.fileno())
        os.replace(tmp, fpath)
        total += off
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fd:
        json.dump(index, fd, indent=2)
    stats = {"files": [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                       for k in range(len(shards))], "tensors": len(items), "bytes": total}
    stats.update(peak.report())
    return stats


# ---- diff -------------------------------------------------------------------------------

def diff(a, b, atol=0.0):
    """Compares two checkpoints tensor by tensor (by full name for partial
    checkpoints, by key path for files), one pair in memory at a time.
    Returns {"only_a", "only_b", "differ": [{name, why | max_abs_diff,
    differing_elements, numel}], "same": count}."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    ta = {n: (d, s, fn) for n, d, s, fn in _catalogue(ca)}
    tb = {n: (d, s, fn) for n, d, s, fn in _catalogue(cb)}
    out = {"only_a": [n for n in ta if n not in tb], "only_b": [n for n in tb if n not in ta],
           "differ": [], "same": 0}
    common = [n for n in ta if n in tb]
    bar = _progress(len(common), "diff", unit="tensor")
    for n in common:
        (da, sa, fa), (db, sb, fb) = ta[n], tb[n]
        bar.update(1)
        if da != db or list(sa) != list(sb):
            out["differ"].append({"name": n, "why": f"{da} {list(sa)} vs {db} {list(sb)}"})
            continue
        x, y = fa(), fb()
        if torch.equal(x, y):
            out["same"] += 1
            continue
        if x.is_floating_point() or x.is_complex():
            d = (x.double() - y.double()).abs()
            close = d <= atol
            close |= (x.isnan() & y.isnan())
        else:
            d = (x.long() - y.long()).abs() if x.dtype != torch.bool else (x != y).long()
            close = d <= atol
        bad = int((~close).sum())
        if bad == 0:
            out["same"] += 1
            continue
        out["differ"].append({"name": n, "max_abs_diff": float(d[~close].max()),
                              "differing_elements": bad, "numel": x.numel()})
    bar.close()
    return out
