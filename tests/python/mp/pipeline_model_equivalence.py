"""Pipeline parallelism through smp.DistributedModel, composed with tensor and
data parallelism, against plain single-process PyTorch (issue 4).

    mpirun -np 4 python pipeline_model_equivalence.py

For every case: a model built under smp.tensor_parallelism() (a Sequential, or a
module whose forward calls two submodules net1 and net2), wrapped with
smp.DistributedModel and trained with smp.DistributedOptimizer inside an
@smp.step function for 5 steps; each rank trains on its dp_rank's share of the
global batch, split into `microbatches`. The reference is the plain model trained
on the whole global batch. After the steps the full parameters gathered with
state_dict(gather_to_rank0=True) must equal the reference's (fp32, atol 1e-5).
Layouts on 2 ranks: pp2; on 4: pp2 x tp2, pp2 x rdp2, pp4; on 8: pp2 x tp2 x rdp2
and pp4 x tp2; schedules simple and interleaved; microbatches 1, 2, 4.
Prints "pipeline_model OK <rank> (<n> cases)".

Memory: right after wrapping (and again after model.to(device)), the bytes held
by all the model's parameters and buffers (distinct storages) must equal those
of this stage's local_parameters()/local_buffers(): the other stages' tensors
are released (empty, same names, dtype and requires_grad; param_spec keeps their
full shapes). Half of the cases build the model on the CPU, wrap it and then call
model.to(device) (the documented way for models larger than one device); the
others place it on the device before wrapping.
"""

import itertools
import os

import torch
import torch.nn.functional as F

import smp
from pipeline_common import Shift, held_bytes

IN, HID, OUT, GLOBAL_BATCH, STEPS = 8, 12, 4, 16, 5
# PIPELINE_MODEL_DEVICE=cuda: one GPU per rank, activations and gradients over NCCL.
DEVICE_TYPE = os.environ.get("PIPELINE_MODEL_DEVICE", "cpu")


def device():
    if DEVICE_TYPE == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TwoNets(torch.nn.Module):
    """As in the public smp MNIST example: forward calls net1, then net2."""

    def __init__(self):
        super().__init__()
        self.net1 = torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.ReLU())
        self.net2 = torch.nn.Sequential(torch.nn.Linear(HID, HID), torch.nn.Tanh(),
                                        torch.nn.Linear(HID, OUT))

    def forward(self, x):
        return self.net2(self.net1(x))


def sequential():
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HID), Shift(HID), torch.nn.ReLU(), torch.nn.Linear(HID, HID),
        torch.nn.Tanh(), torch.nn.Linear(HID, HID), torch.nn.ReLU(), torch.nn.Linear(HID, OUT))


MODELS = {"sequential": sequential, "two_nets": TwoNets}


def global_batch(step):
    g = torch.Generator().manual_seed(50 + step)
    return (torch.randn(GLOBAL_BATCH, IN, generator=g).to(device()),
            torch.randn(GLOBAL_BATCH, OUT, generator=g).to(device()))


@smp.step
def train_step(model, x, y):
    loss = F.mse_loss(model(x), y)
    model.backward(loss)
    return loss


def check_released(model, reference, where):
    """Every rank holds only its stage's parameters and buffers."""
    local = list(model.local_parameters()) + list(model.local_buffers())
    everything = list(model.get_module().parameters()) + list(model.get_module().buffers())
    local_ids = {id(t) for t in local}
    total, mine = held_bytes(everything), held_bytes(local)
    expected = sum(t.numel() * t.element_size() for t in local)
    if not (total == mine == expected and mine > 0):
        raise AssertionError(
            f"{where} rank {smp.rank()} (pp_rank {smp.pp_rank()}): parameters and buffers hold "
            f"{total} bytes, this stage's {mine} (numel x element size {expected})")
    ref_shapes = {n: tuple(t.shape) for n, t in reference.named_parameters()}
    names = [n for n, _ in model.get_module().named_parameters()]
    if smp.tp_size() == 1 and names != list(ref_shapes):
        raise AssertionError(f"{where}: parameter names {names} != {list(ref_shapes)}")
    for name, p in model.get_module().named_parameters():
        if model.param_spec(name)["global_shape"] != ref_shapes[name]:
            raise AssertionError(f"{where}: param_spec({name}) {model.param_spec(name)} has not "
                                 f"the full shape {ref_shapes[name]}")
        if p.dtype != torch.float32 or not p.requires_grad:
            raise AssertionError(f"{where}: {name} has dtype {p.dtype}, requires_grad "
                                 f"{p.requires_grad}")
        if id(p) not in local_ids and p.numel() != 0:
            raise AssertionError(f"{where}: {name} of another stage has shape {tuple(p.shape)}")
    for name, b in model.get_module().named_buffers():
        if id(b) not in local_ids and b.numel() != 0:
            raise AssertionError(f"{where}: buffer {name} of another stage has shape "
                                 f"{tuple(b.shape)}")


def run_case(layout, schedule, microbatches, model_name, optimizer_name, move_after_wrap):
    pp, tp = layout
    smp.init({"pipeline_parallel_degree": pp, "tensor_parallel_degree": tp, "ddp": True,
              "microbatches": microbatches, "pipeline": schedule})
    if DEVICE_TYPE == "cuda":
        torch.cuda.set_device(smp.local_rank())
    try:
        torch.manual_seed(3)
        reference = MODELS[model_name]().to(device())
        torch.manual_seed(3)
        where = (f"pp{pp} tp{tp} rdp{smp.rdp_size()} {schedule} mb{microbatches} {model_name} "
                 f"{optimizer_name}{' moved after wrapping' if move_after_wrap else ''}")
        with smp.tensor_parallelism():
            net = MODELS[model_name]()
        if not move_after_wrap:
            net = net.to(device())
        model = smp.DistributedModel(net)
        check_released(model, reference, where)
        if move_after_wrap:
            # Built on the CPU, wrapped, then moved: only this stage's tensors move.
            assert model.to(device()) is model
            check_released(model, reference, where + " (after .to)")
            for t in list(model.local_parameters()) + list(model.local_buffers()):
                assert t.device == device(), (where, t.device)
        make_opt = (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)) \
            if optimizer_name == "sgd" else (lambda ps: torch.optim.Adam(ps, lr=1e-2))
        optimizer = smp.DistributedOptimizer(make_opt(list(model.parameters())))
        ref_opt = make_opt(list(reference.parameters()))
        share = GLOBAL_BATCH // smp.dp_size()
        for step in range(STEPS):
            x, y = global_batch(step)
            lo = smp.dp_rank() * share
            optimizer.zero_grad()
            out = train_step(model, x[lo:lo + share], y[lo:lo + share])
            optimizer.step()
            ref_opt.zero_grad()
            ref_loss = F.mse_loss(reference(x), y)
            ref_loss.backward()
            ref_opt.step()
            # The mean loss over microbatches of this rank's share, on every stage.
            mine = torch.tensor([float(out.reduce_mean())], device=device())
            smp.comm.allreduce(mine, group=smp.DP_GROUP, op=smp.ReduceOp.AVG)
            if abs(float(mine) - float(ref_loss)) > 1e-5:
                raise AssertionError(f"{where}: step {step} loss {float(mine)} != plain "
                                     f"{float(ref_loss)}")
        full = model.state_dict(gather_to_rank0=True) if smp.rdp_rank() == 0 else {}
        if smp.rank() == 0:
            ref = reference.state_dict()
            if full.keys() != ref.keys():
                raise AssertionError(f"state dict keys {sorted(full)} != {sorted(ref)}")
            for name, value in ref.items():
                if not torch.allclose(full[name].to(value.device), value, atol=1e-5, rtol=0):
                    diff = (full[name].to(value.device) - value).abs().max().item()
                    raise AssertionError(f"{where}: parameter {name} differs by {diff}")
    finally:
        smp.shutdown()


def cases_for(world):
    """(layout (pp, tp), schedule, microbatches, model, optimizer, move after
    wrapping) with ddp on: rdp = world / (pp * tp)."""
    cases = []
    if world in (2, 8):
        # 2 ranks: pp2 alone (what 2 GPUs allow). 8 ranks (issue 6): pp2 x tp2 x
        # rdp2, the grid where every group kind has two members, and pp4 x tp2.
        # Both schedules, microbatches 1/2/4, both models, SGD and Adam.
        pp2 = (2, 1) if world == 2 else (2, 2)
        for schedule, microbatches in itertools.product(["simple", "interleaved"], [1, 2, 4]):
            model_name = "two_nets" if microbatches == 2 else "sequential"
            cases.append((pp2, schedule, microbatches, model_name, "sgd", schedule == "simple"))
        cases.append((pp2, "interleaved", 4, "two_nets", "adam", True))
        if world == 8:
            cases.append(((4, 2), "interleaved", 4, "sequential", "adam", False))
        return cases
    if world != 4:
        raise SystemExit(f"pipeline_model_equivalence.py runs on 2, 4 or 8 ranks, not {world}")
    for layout, schedule, microbatches in itertools.product(
            [(2, 2), (2, 1), (4, 1)], ["simple", "interleaved"], [1, 2, 4]):
        if layout == (4, 1) and microbatches == 2:
            continue
        model_name = "two_nets" if (microbatches == 2 and layout == (2, 2)) else "sequential"
        cases.append((layout, schedule, microbatches, model_name, "sgd", schedule == "simple"))
    cases.append(((2, 2), "interleaved", 4, "two_nets", "adam", True))
    cases.append(((2, 1), "simple", 2, "two_nets", "adam", False))
    cases.append(((4, 1), "interleaved", 4, "sequential", "adam", True))
    return cases


def main():
    smp.init({"ddp": True})
    world = smp.size()
    smp.shutdown()
    cases = cases_for(world)
    for case in cases:
        run_case(*case)
    smp.init({"ddp": True})
    print(f"pipeline_model OK {smp.rank()} ({len(cases)} cases)", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
