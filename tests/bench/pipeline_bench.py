"""Step time of the two pipeline paths at pp 2 (not a test).

smp.DistributedModel runs a pipelined model on one of two paths
(docs/pipeline.md): the fx path (the forward traced with torch.fx as a chain;
stages exchange one activation tensor per microbatch under the C++ schedule)
and the module-level path (smp.pipeline.modcall: module subtrees on stages,
cross-stage module calls driven by stage 0). This times one training step
(smp.step forward and backward over the microbatches, then the optimizer
step) for:

- Hugging Face GPT-2 (GPT2LMHeadModel built from a config, no download;
  keyword inputs, tied embeddings) on the module path, under the interleaved
  and simple schedules. The fx path cannot trace GPT-2, so it has no row.
- a chain of Linear + GELU blocks that both paths run (SMP_PIPELINE_MODE=fx
  and =module), under both schedules: the two paths side by side.
- plain PyTorch on rank 0 alone, the same model and global batch, for scale.

    mpirun -np 2 python tests/bench/pipeline_bench.py                    # CPU
    mpirun -np 2 python tests/bench/pipeline_bench.py --device cuda      # one GPU per rank

Options: --gpt2 small (the 124M GPT-2 small config: 12 layers, 768 wide,
vocabulary 50257; the default) or tiny (4 layers, 256 wide, vocabulary 50257:
for a CPU shared with other work), --seq (default 128), --batch (global rows,
default 8), --microbatches (default 4), --steps (timed steps per case,
default 10), --budget (seconds for the timed steps of all cases together,
default 300: each case stops once its share is spent, after at least one
timed step). Each step's time is the slowest pipeline stage's; the table shows
the median and the number of timed steps. Rank 0 prints the table.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import smp


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--gpt2", choices=["small", "tiny"], default="small")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget", type=float, default=300.0)
    p.add_argument("--chain-width", type=int, default=1024)
    p.add_argument("--chain-blocks", type=int, default=8)
    return p.parse_args()


def gpt2(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.gpt2 == "small":
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    else:
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=50257)
    cfg.update(dict(n_positions=max(args.seq, 128), use_cache=False, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def gpt2_batch(args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (args.batch, args.seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.to(device)}


def chain(args):
    torch.manual_seed(0)
    w = args.chain_width
    blocks = []
    for _ in range(args.chain_blocks):
        blocks += [torch.nn.Linear(w, w), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(w, 16))


def chain_batch(args, device):
    g = torch.Generator().manual_seed(1)
    rows = args.batch * args.seq // 16     # about as many rows as GPT-2 has tokens / 16
    rows -= rows % args.microbatches
    return {"x": torch.randn(rows, args.chain_width, generator=g).to(device),
            "y": torch.randint(0, 16, (rows,), generator=g).to(device)}


def loss_of(kind, model, inputs):
    if kind == "gpt2":
        return model(**inputs)["loss"]
    return F.cross_entropy(model(inputs["x"]), inputs["y"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def slowest(seconds):
    t = torch.tensor([seconds], dtype=torch.float64)
    smp.comm.allreduce(t, group=smp.PP_GROUP, op=smp.ReduceOp.MAX)
    return float(t)


def timed(one_step, device, steps, budget, collective=True):
    """Median seconds of ``one_step`` after one warm-up step, and the count."""
    one_step()
    times, spent = [], 0.0
    while len(times) < steps and (not times or spent < budget):
        if collective:
            smp.barrier(smp.PP_GROUP)
        sync(device)
        start = time.perf_counter()
        one_step()
        sync(device)
        took = time.perf_counter() - start
        took = slowest(took) if collective else took
        times.append(took)
        # every rank stops after the same step: the slowest rank's time decides
        spent += took
    return statistics.median(times), len(times)


def run_case(args, kind, mode, schedule, device, budget):
    os.environ["SMP_PIPELINE_MODE"] = mode
    smp.init({"pipeline_parallel_degree": 2, "microbatches": args.microbatches,
              "pipeline": schedule})
    try:
        net = gpt2(args) if kind == "gpt2" else chain(args)
        model = smp.DistributedModel(net)
        inputs = gpt2_batch(args, device) if kind == "gpt2" else chain_batch(args, device)

        @smp.step
        def train_step(model, inputs):
            loss = loss_of(kind, model, inputs)
            model.backward(loss)
            return loss

        # .to() partitions (and releases the other stage's tensors), then
        # moves this stage's tensors
        model.to(device)
        opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-4))

        def one_step():
            opt.zero_grad()
            train_step(model, inputs)
            opt.step()

        used = "module" if getattr(model, "_smp_module_pipeline", False) else "fx"
        sec, n = timed(one_step, device, args.steps, budget)
        if used != mode and mode != "auto":
            raise SystemExit(f"asked for the {mode} path, ran the {used} path")
        return sec, n, used
    finally:
        smp.shutdown()
        os.environ.pop("SMP_PIPELINE_MODE", None)


def plain_case(args, kind, device, budget):
    net = (gpt2(args) if kind == "gpt2" else chain(args)).to(device)
    inputs = gpt2_batch(args, device) if kind == "gpt2" else chain_batch(args, device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    def one_step():
        opt.zero_grad()
        loss_of(kind, net, inputs).backward()
        opt.step()

    return timed(one_step, device, args.steps, budget, collective=False)


def main():
    args = parse()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    cases = [("gpt2", "module", "interleaved"), ("gpt2", "module", "simple"),
             ("chain", "fx", "interleaved"), ("chain", "fx", "simple"),
             ("chain", "module", "interleaved"), ("chain", "module", "simple")]
    share = args.budget / (len(cases) + 2)
    rows = []
    for kind, mode, schedule in cases:
        sec, n, used = run_case(args, kind, mode, schedule, device, share)
        rows.append((kind, f"pp2 {used} path", schedule, sec, n))
    plain = {}
    if rank == 0:
        for kind in ("gpt2", "chain"):
            plain[kind] = plain_case(args, kind, device, share)
    if rank == 0:
        size = "124M GPT-2 small" if args.gpt2 == "small" else "tiny GPT-2 (4x256)"
        print(f"pipeline step time, {device.type}, global batch {args.batch} x seq {args.seq}, "
              f"{args.microbatches} microbatches; gpt2 = {size}; chain = "
              f"{args.chain_blocks} x Linear({args.chain_width}) + GELU, "
              f"{chain_batch(args, 'cpu')['x'].shape[0]} rows")
        print(f"{'model':<6} {'how':<20} {'schedule':<12} {'median ms':>10} {'steps':>6}")
        for kind, how, schedule, sec, n in rows:
            print(f"{kind:<6} {how:<20} {schedule:<12} {sec * 1e3:>10.1f} {n:>6}")
        for kind, (sec, n) in plain.items():
            print(f"{kind:<6} {'plain, 1 process':<20} {'-':<12} {sec * 1e3:>10.1f} {n:>6}")


if __name__ == "__main__":
    main()
