"""The smp-checkpoint command (also `python -m smp.checkpoint`): inspect, verify,
consolidate, reshard, export and diff checkpoints offline. See docs/tools.md.

Exit status: 0 on success, 1 when verify finds a problem or diff finds a
difference, 2 on an error (the message names the file and the fix).
"""

import argparse
import json
import signal
import sys

from smp._C import CheckpointError
from smp.checkpoint import tools


def _inspect(a):
    ds = [tools.inspect(p) for p in tools.checkpoints_in(a.path)]
    if a.json:
        print(json.dumps(ds[0] if len(ds) == 1 else ds, indent=2))
    else:
        print("\n\n".join(tools.format_inspect(d) for d in ds))
    return 0 if all(d["complete"] for d in ds) else 1


def _verify(a):
    rc = 0
    for path in tools.checkpoints_in(a.path):
        ok, problems = tools.verify(path)
        if ok:
            print(f"OK: '{path}': every file present, every CRC-32 matches, manifest consistent")
            continue
        rc = 1
        print(f"FAILED: '{path}': {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
    return rc


def _peak_line(s):
    return (f"peak memory growth {tools.human(s['peak_rss_growth'])} (resident set, sampled "
            f"after each tensor; largest tensor {tools.human(s['largest_tensor'])}, 2x = "
            f"{tools.human(s['bound'])})")


def _consolidate(a):
    s = tools.consolidate(a.path, a.out, threads=a.threads)
    print(f"wrote '{a.out}': {s['tensors']} tensors, {tools.human(s['bytes'])} in "
          f"{s['seconds']:.2f} s; {_peak_line(s)}")
    return 0


def _reshard(a):
    s = tools.reshard_offline(a.path, a.out, pp=a.pp, tp=a.tp, rdp=a.rdp, threads=a.threads)
    for c in s.get("checkpoints", [s]):
        print(f"wrote '{c['manifest']}' and {len(c['files'])} files "
              f"({tools.human(c['bytes'])}) for pp {a.pp} x tp {a.tp} x rdp {a.rdp} in "
              f"{c['seconds']:.2f} s; {_peak_line(c)}")
    return 0


def _export(a):
    if a.format != "safetensors":
        raise CheckpointError(f"export format '{a.format}' is not supported; use safetensors")
    s = tools.export_safetensors(a.path, a.out, max_shard_size=a.max_shard_size)
    print(f"wrote {len(s['files'])} safetensors file(s) and model.safetensors.index.json to "
          f"'{a.out}': {s['tensors']} tensors, {tools.human(s['bytes'])}; {_peak_line(s)}")
    return 0


def _diff(a):
    d = tools.diff(a.a, a.b, atol=a.atol)
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        for n in d["only_a"]:
            print(f"only in A: {n}")
        for n in d["only_b"]:
            print(f"only in B: {n}")
        for x in d["differ"]:
            if "why" in x:
                print(f"differs:   {x['name']}: {x['why']}")
            else:
                print(f"differs:   {x['name']}: max |a-b| {x['max_abs_diff']:.6g}, "
                      f"{x['differing_elements']} of {x['numel']} elements")
        print(f"{d['same']} equal, {len(d['differ'])} different, {len(d['only_a'])} only in A, "
              f"{len(d['only_b'])} only in B")
    return 0 if not (d["differ"] or d["only_a"] or d["only_b"]) else 1


def parser():
    p = argparse.ArgumentParser(
        prog="smp-checkpoint",
        description="Inspect, verify, consolidate, reshard and export smp checkpoints offline "
                    "(one machine, no GPU, no job). PATH: the name given to smp.save "
                    "(e.g. /ckpt/model.pt), its .smp_manifest.json, or one file.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="layout, save id, completeness and every tensor")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=_inspect)
    s = sub.add_parser("verify", help="every file present, every CRC-32, manifest consistent")
    s.add_argument("path")
    s.set_defaults(fn=_verify)
    s = sub.add_parser("consolidate", help="a partial checkpoint into one full file "
                                           "(torch.load(weights_only=True) reads it)")
    s.add_argument("path")
    s.add_argument("out")
    s.add_argument("--threads", type=int, default=4)
    s.set_defaults(fn=_consolidate)
    s = sub.add_parser("reshard", help="rewrite a partial checkpoint for another layout")
    s.add_argument("path")
    s.add_argument("out")
    s.add_argument("--pp", type=int, required=True)
    s.add_argument("--tp", type=int, required=True)
    s.add_argument("--rdp", type=int, default=1)
    s.add_argument("--threads", type=int, default=4)
    s.set_defaults(fn=_reshard)
    s = sub.add_parser("export", help="the model state as Hugging Face-style safetensors shards")
    s.add_argument("path")
    s.add_argument("out", help="output folder")
    s.add_argument("--format", default="safetensors", choices=["safetensors"])
    s.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MiB (default 5GB)")
    s.set_defaults(fn=_export)
    s = sub.add_parser("diff", help="which tensors differ, and by how much")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--atol", type=float, default=0.0, help="differences up to this are equal")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_diff)
    return p


def main(argv=None):
    if hasattr(signal, "SIGPIPE"):  # `smp-checkpoint inspect ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"smp-checkpoint {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
