# mpirun -np 2 or 4 (pp = world size): training with smp.step over a pipelined
# Sequential equals plain PyTorch on the full batch, for microbatches 1, 2, 4
# and both schedules; plus activation memory in bytes (autograd's saved tensors,
# counted through saved_tensors_hooks: interleaved keeps at most
# min(pp - stage, active_microbatches) microbatches' worth, simple all of them),
# the in-flight bound, evaluation steps, StepOutput on every stage and error texts.
import sys

import torch
import torch.nn.functional as F

import smp
from pipeline_common import SavedActivationBytes

world = int(sys.argv[1])
BATCH = 8


def make_model():
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def reference(steps):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        x, y = data(i)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return dict(model.named_parameters()), losses


@smp.step
def train_step(model, x, y):
    out = model(x)
    loss = F.mse_loss(out, y)
    model.backward(loss)
    return loss, out


@smp.step
def eval_step(model, x):
    return model(x)


ref_params, ref_losses = reference(5)
for pipeline in ("simple", "interleaved"):
    for mbs in (1, 2, 4):
        smp.init({"pipeline_parallel_degree": world, "microbatches": mbs, "pipeline": pipeline})
        me = smp.rank()
        pm = smp.pipeline.PipelineModule(make_model())
        opt = torch.optim.SGD(pm.local_parameters(), lr=0.1)
        for i in range(5):
            x, y = data(i)
            opt.zero_grad()
            loss_mb, out_mb = train_step(pm, x, y)
            loss = loss_mb.reduce_mean()  # on every stage
            assert abs(loss.item() - ref_losses[i]) < 1e-5, (pipeline, mbs, i, loss, ref_losses[i])
            # Every stage holds every microbatch's values (smp v1's StepOutput).
            assert len(out_mb.outputs) == mbs and out_mb.concat().shape == (BATCH, 3)
            opt.step()
        names = {id(p): n for n, p in pm.module.named_parameters()}
        local = pm.local_parameters()
        assert local, (smp.rank(), pm.stage_assignment())
        for p in local:
            torch.testing.assert_close(p, ref_params[names[id(p)]], atol=1e-5, rtol=0)
        stats = smp.pipeline.last_step_stats()
        bound = mbs if pipeline == "simple" else min(mbs, smp.pp_size() - smp.pp_rank())
        assert stats["max_live_microbatches"] <= bound, (stats, bound)
        if pipeline == "simple":
            assert stats["max_live_microbatches"] == mbs, stats
        smp.shutdown()

def peak_activation_bytes(microbatches, pipeline, batch, active=None):
    """(peak saved-activation bytes of one training step, pp_rank)."""
    cfg = {"pipeline_parallel_degree": world, "microbatches": microbatches, "pipeline": pipeline}
    if active is not None:
        cfg["active_microbatches"] = active
    smp.init(cfg)
    try:
        pm = smp.pipeline.PipelineModule(make_model())
        x, y = data(0)
        peak = SavedActivationBytes(pm.module.parameters()).measure(
            train_step, pm, x[:batch], y[:batch])
        return peak, smp.pp_rank()
    finally:
        smp.shutdown()


# Memory in bytes, measured (not the engine's own count): the activations one
# microbatch leaves for backward on this stage, then 4 microbatches of the same
# size. simple holds all 4 at the end of its forwards; interleaved (1F1B) holds
# at most pp - stage of them, and at most active_microbatches.
MB = BATCH // 4
one, stage = peak_activation_bytes(1, "simple", MB)
assert one > 0, one
simple, _ = peak_activation_bytes(4, "simple", BATCH)
assert simple == 4 * one, (stage, simple, one)
inter, _ = peak_activation_bytes(4, "interleaved", BATCH)
assert inter <= min(4, world - stage) * one, (stage, inter, one)
for active in (1, 2):
    bounded, _ = peak_activation_bytes(4, "interleaved", BATCH, active)
    assert bounded <= active * one, (stage, active, bounded, one)
print(f"activation bytes (stage {stage}): one microbatch {one}, 4 microbatches: simple "
      f"{simple}, interleaved {inter}", flush=True)

# In-flight bound: active_microbatches 1 and 2 with 4 microbatches.
for active in (1, 2):
    smp.init({"pipeline_parallel_degree": world, "microbatches": 4, "active_microbatches": active})
    pm = smp.pipeline.PipelineModule(make_model())
    x, y = data(0)
    loss = train_step(pm, x, y)[0].reduce_sum()
    assert abs(loss.item() - 4 * ref_losses[0]) < 4e-5, (loss, ref_losses[0])
    stats = smp.pipeline.last_step_stats()
    assert stats["max_live_microbatches"] <= active, (active, stats)
    # evaluation: no backward anywhere; the outputs on every stage
    with torch.no_grad():
        out = eval_step(pm, x)
    torch.testing.assert_close(out.concat(), make_model()(x), atol=1e-6, rtol=0)
    # the model outside a step
    try:
        pm(x)
        raise AssertionError("model call outside smp.step")
    except smp.StateError as e:
        assert "call it inside a function decorated with @smp.step" in str(e), e
    smp.shutdown()


# A non-Sequential model (as smp's MNIST example): its forward is a chain of
# submodule calls and torch operations, placed manually (pp 2) or automatically.
class Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        with smp.partition(0):
            self.a = torch.nn.Linear(6, 10)
            self.b = torch.nn.Linear(10, 10)
        with smp.partition(1 if world == 2 else 0):
            self.c = torch.nn.Linear(10, 8)
            self.d = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = self.b(x) * 2
        x = x.relu()
        x = self.c(x)
        x = F.gelu(self.d(x))
        return torch.flatten(x, 1)


ref = Grouped()
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
for pipeline in ("simple", "interleaved"):
    smp.init({"pipeline_parallel_degree": world, "microbatches": 2, "pipeline": pipeline,
              "auto_partition": world != 2})
    pm = smp.pipeline.PipelineModule(Grouped())
    opt = torch.optim.SGD(pm.local_parameters(), lr=0.05)
    if world == 2:
        assert pm.stage_assignment() == {"a": 0, "b": 0, "c": 1, "d": 1}, pm.stage_assignment()
    if pipeline == "simple":
        ref_losses = []
        for i in range(3):
            x, y = data(i)
            ref_opt.zero_grad()
            loss = F.mse_loss(ref(x), y)
            loss.backward()
            ref_opt.step()
            ref_losses.append(loss.item())
        ref_params = dict(ref.named_parameters())
    for i in range(3):
        x, y = data(i)
        opt.zero_grad()
        loss = train_step(pm, x, y)[0].reduce_mean()
        assert abs(loss.item() - ref_losses[i]) < 1e-5, (pipeline, i, loss, ref_losses[i])
        opt.step()
    names = {id(p): n for n, p in pm.module.named_parameters()}
    for p in pm.local_parameters():
        torch.testing.assert_close(p, ref_params[names[id(p)]], atol=1e-5, rtol=0)
    smp.shutdown()

# With 4 ranks: pp 2 x rdp 2 (ddp), both replicas on the same data; activations
# travel inside each PP_GROUP.
if world == 4:
    smp.init({"pipeline_parallel_degree": 2, "microbatches": 2, "ddp": True})
    pm = smp.pipeline.PipelineModule(make_model())
    opt = torch.optim.SGD(pm.local_parameters(), lr=0.1)
    ref_params, ref_losses = reference(2)
    for i in range(2):
        x, y = data(i)
        opt.zero_grad()
        loss = train_step(pm, x, y)[0].reduce_mean()
        assert abs(loss.item() - ref_losses[i]) < 1e-5, (i, loss, ref_losses[i])
        opt.step()
    names = {id(p): n for n, p in pm.module.named_parameters()}
    for p in pm.local_parameters():
        torch.testing.assert_close(p, ref_params[names[id(p)]], atol=1e-5, rtol=0)
    smp.shutdown()

print(f"pipeline_train OK {me}", flush=True)
