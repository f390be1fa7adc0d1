"""Tensor parallelism for Hugging Face GPT-2 and BERT (smp.nn.huggingface)
against the plain model: forward on each rank's rows, training steps (losses
and gathered parameters, atol 1e-5 in float32, 1e-10 in float64), the gathered
state dict loadable by the plain model (strict), Hugging Face state dicts and
save_pretrained output round-tripping, and checkpoints.

    mpirun -np N python3 hf_tp.py train MODEL TP PP DTYPE [SCHEDULE]
                                         # N = TP x PP x rdp; SCHEDULE interleaved|simple
    mpirun -np 2 python3 hf_tp.py roundtrip DIR              # tp 2, GPT-2 and BERT
    mpirun -np 4 python3 hf_tp.py checkpoint DIR             # tp 2 x pp 2, GPT-2
    mpirun -np 4 python3 hf_tp.py train gpt2 4 1 float32 + train bert 2 1 float32
                                                             # several cases, "+" between

MODEL: gpt2 (GPT2LMHeadModel, tied embeddings, labels, padding mask), bert
(BertForMaskedLM, tied embeddings, padding mask) or roberta (RobertaForMaskedLM). Prints "hf_tp OK <rank>".
"""

import os
import sys

import torch

import smp
import smp.comm

STEPS = 2
LR = 0.1


def build(kind, dtype=torch.float32, seed=1234):
    torch.manual_seed(seed)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
        net = GPT2LMHeadModel(cfg)
    elif kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        net = BertForMaskedLM(cfg)
    elif kind == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=40, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        net = RobertaForMaskedLM(cfg)
    else:
        raise SystemExit(f"unknown model {kind}")
    return net.to(dtype)


def build_tp(kind, dtype=torch.float32, seed=1234):
    """The same model created under smp.tensor_parallelism()."""
    with smp.tensor_parallelism():
        return build(kind, dtype, seed)


def batch(step, size):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 64, (size, 12), generator=g)
    mask = torch.ones(size, 12, dtype=torch.long)
    mask[::2, -3:] = 0          # right padding on every other row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def rows(full):
    n = full["input_ids"].shape[0] // smp.dp_size()
    return {k: v[smp.dp_rank() * n:(smp.dp_rank() + 1) * n] for k, v in full.items()}


def close(a, b, atol, what):
    assert a.shape == b.shape, (what, tuple(a.shape), tuple(b.shape))
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    assert err <= atol, f"{what} differs by {err} (atol {atol}) on rank {smp.rank()}"


def check_replaced(model, kind):
    from smp.nn.huggingface.bert import DistributedBertLayer
    from smp.nn.huggingface.gpt2 import DistributedGPT2Block

    m = model.get_module()
    layers = m.transformer.h if kind == "gpt2" else getattr(m, kind).encoder.layer
    want = DistributedGPT2Block if kind == "gpt2" else DistributedBertLayer
    assert all(type(layer) is want for layer in layers), [type(x) for x in layers]
    fns = smp.state.module_manager.translate_functions
    want_kind = "gpt2" if kind == "gpt2" else "bert"     # RoBERTa translates as BERT
    assert [f.kind for f in fns if hasattr(f, "kind")] == [want_kind], fns


def train(kind, tp, pp, dtype_name, schedule="interleaved"):
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    smp.init({"tensor_parallel_degree": tp, "pipeline_parallel_degree": pp,
              "microbatches": 2, "ddp": True, "pipeline": schedule})
    plain = build(kind, dtype)
    model = smp.DistributedModel(build_tp(kind, dtype))
    check_replaced(model, kind)
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    ref_opt = torch.optim.SGD(plain.parameters(), lr=LR)
    size = 4 * smp.dp_size()

    @smp.step
    def train_step(model, inputs):
        out = model(**inputs)
        model.backward(out["loss"])
        return out["loss"], out["logits"]

    @smp.step
    def eval_step(model, inputs):
        with torch.no_grad():
            return model(**inputs)["logits"]

    for step in range(STEPS):
        full = batch(step, size)
        mine = rows(full)
        with torch.no_grad():   # forward on this rank's rows, before the step
            plain.eval()
            ref_logits = plain(**mine)["logits"]
            plain.train()
        close(eval_step(model, mine).concat(), ref_logits, atol, f"step {step} logits")
        opt.zero_grad()
        loss, logits = train_step(model, mine)
        close(logits.concat(), ref_logits, atol, f"step {step} training logits")
        opt.step()
        ref_opt.zero_grad()
        ref = plain(**full)["loss"]
        ref.backward()
        ref_opt.step()
        t = loss.reduce_mean().detach().reshape(1).clone()
        smp.comm.allreduce(t, smp.CommGroup.DP_GROUP)
        # Hugging Face computes the loss in float32 (ForCausalLMLoss / the MLM
        # loss upcast the logits), also for a float64 model
        close(t / smp.dp_size(), ref.detach().reshape(1), max(atol, 1e-5), f"step {step} loss")

    sd = model.state_dict(gather_to_rank0=True)
    if smp.rank() == 0:
        ref_sd = plain.state_dict()
        assert list(sd) == list(ref_sd), (set(sd) ^ set(ref_sd))
        for k, v in ref_sd.items():
            close(sd[k], v, atol, f"gathered {k}")
        fresh = build(kind, dtype, seed=99)
        fresh.load_state_dict(sd, strict=True)
    # smp's own names on request
    raw = model.state_dict(gather_to_rank0=True, translate=False)
    if smp.rank() == 0:
        assert any(".attention.query.weight" in k for k in raw), list(raw)[:8]
    smp.shutdown()


def roundtrip(directory):
    """HF state dict -> smp model (tp) -> gathered -> HF model: identical
    parameters; save_pretrained output loads into the smp model, and the
    gathered dict saved with save_pretrained(state_dict=...) loads with
    from_pretrained."""
    for kind in ("gpt2", "bert"):
        smp.init({"tensor_parallel_degree": 2, "ddp": True})
        source = build(kind, seed=5)
        src_dir = os.path.join(directory, f"{kind}_src")
        if smp.rank() == 0:
            source.save_pretrained(src_dir)
        smp.barrier()
        cls = type(source)
        loaded = cls.from_pretrained(src_dir)
        model = smp.DistributedModel(build_tp(kind, seed=6))   # other weights
        check_replaced(model, kind)
        result = model.load_state_dict(loaded.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        sd = model.state_dict(gather_to_rank0=True)
        out_dir = os.path.join(directory, f"{kind}_out")
        if smp.rank() == 0:
            plain = build(kind, seed=7)
            plain.load_state_dict(sd, strict=True)
            for (n, a), (_, b) in zip(source.state_dict().items(), plain.state_dict().items()):
                assert torch.equal(a, b), n
            model.get_module().save_pretrained(out_dir, state_dict=sd)
            again = cls.from_pretrained(out_dir)
            for (n, a), (_, b) in zip(source.state_dict().items(), again.state_dict().items()):
                assert torch.equal(a, b), n
        smp.barrier()
        smp.shutdown()


def checkpoint(directory):
    """GPT-2 at tp 2 x pp 2: partial save_checkpoint, resume in a differently
    initialised model equal to uninterrupted training; a full checkpoint is
    the Hugging Face model's state dict and resumes; the partial checkpoint
    resumes on tp 4 x pp 1 (resharded) too."""
    def setup(seed):
        smp.init({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2,
                  "microbatches": 2, "ddp": True})
        model = smp.DistributedModel(build_tp("gpt2", seed=seed))
        opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR,
                                                       momentum=0.9))
        return model, opt

    @smp.step
    def train_step(model, inputs):
        out = model(**inputs)
        model.backward(out["loss"])
        return out["loss"]

    def step(model, opt, i):
        opt.zero_grad()
        loss = train_step(model, rows(batch(i, 8))).reduce_mean()   # the same global batch
        opt.step()
        t = loss.detach().reshape(1).clone()
        smp.comm.allreduce(t, smp.CommGroup.DP_GROUP)
        return float(t) / smp.dp_size()

    model, opt = setup(1234)
    step(model, opt, 0)
    smp.save_checkpoint(directory, tag="s1", partial=True, model=model, optimizer=opt)
    smp.save_checkpoint(directory, tag="full1", partial=False, model=model, optimizer=opt)
    expected = [step(model, opt, i) for i in range(1, 3)]
    smp.shutdown()

    model, opt = setup(777)
    if smp.rank() == 0:   # the full checkpoint is the plain model's state dict
        plain = build("gpt2", seed=3)
        plain.load_state_dict(torch.load(os.path.join(directory, "full1"), weights_only=True),
                              strict=True)
    smp.resume_from_checkpoint(directory, tag="s1", partial=True)
    resumed = [step(model, opt, i) for i in range(1, 3)]
    assert max(abs(a - b) for a, b in zip(resumed, expected)) < 1e-6, (resumed, expected)
    smp.shutdown()

    model, opt = setup(888)
    smp.resume_from_checkpoint(directory, tag="full1", partial=False, load_optimizer=True)
    again = [step(model, opt, i) for i in range(1, 3)]
    assert max(abs(a - b) for a, b in zip(again, expected)) < 1e-5, (again, expected)
    smp.shutdown()

    # the partial checkpoint resumed on another layout (tp 4, no pipeline): resharded
    smp.init({"tensor_parallel_degree": 4, "ddp": True})
    model = smp.DistributedModel(build_tp("gpt2", seed=999))
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    smp.resume_from_checkpoint(directory, tag="s1", partial=True)
    other = [step(model, opt, i) for i in range(1, 3)]
    assert max(abs(a - b) for a, b in zip(other, expected)) < 1e-5, (other, expected)
    smp.shutdown()


def main():
    """Runs the cases given on the command line, separated by "+", in order
    (one launch, one import of transformers), then prints the OK line."""
    args = sys.argv[1:]
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    cases = [[]]
    for a in args:
        if a == "+":
            cases.append([])
        else:
            cases[-1].append(a)
    for case in cases:
        mode = case[0]
        if mode == "train":
            train(case[1], int(case[2]), int(case[3]), case[4], *case[5:])
        elif mode == "roundtrip":
            roundtrip(case[1])
        elif mode == "checkpoint":
            checkpoint(case[1])
        else:
            raise SystemExit(f"unknown mode {mode}")
        if rank == 0:
            print(f"case {' '.join(case)}: passed", flush=True)
    print(f"hf_tp OK {rank}", flush=True)


if __name__ == "__main__":
    main()
