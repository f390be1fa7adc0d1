# mpirun -np 4: tp 2 x rdp 2, sharded optimizer state. What smp v1 integrations
# call, on several ranks: smp.state read by one rank only (no collective),
# DistributedOptimizer's local_state_dict(gather_if_shard=...) and an LR
# scheduler over the sharded optimizer, smp.amp.GradScaler agreeing across all
# ranks (an inf on one tp rank), and the per-group barriers.
import copy

import torch

import smp

smp.init({"tensor_parallel_degree": 2, "ddp": True, "shard_optimizer_state": True,
          "microbatches": 1})
r = smp.rank()


def check(cond, what):
    if not cond:
        raise AssertionError(f"v1_api rank {r}: {what}")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


torch.manual_seed(0)
with smp.tensor_parallelism():
    net = Net()
model = smp.DistributedModel(net)
optimizer = smp.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1))
sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def train_step(i, scaler=None, poison=False):
    optimizer.zero_grad()
    x = torch.full((2, 4), float(i + 1 + smp.dp_rank()))
    loss = model(x).square().mean()
    model.backward(scaler.scale(loss) if scaler else loss)
    if poison:
        p = next(p for p in model.parameters() if model.is_distributed_parameter(p)
                 and p.grad is not None)
        p.grad.view(-1)[0] = float("inf")
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


# ---- smp.state on one rank only: no collective behind it ----------------------------
if r == 3:
    cfg = smp.state.cfg
    check(cfg.tensor_parallel_degree == 2 and cfg.shard_optimizer_state is True, "cfg")
    check(cfg.prescaled_batch is False and cfg.fp16 is False, "cfg flags")
    check(smp.num_microbatches() == 1, "num_microbatches")
    check(smp.state.model is model and smp.state.optimizer is optimizer, "state model/optimizer")
    check(smp.state.tp_process_group is smp.get_tp_process_group(), "tp process group")
    check(smp.state.get_data_parallel_world_size() == smp.rdp_size() == 2, "mpu sizes")
smp.barrier(timeout=60)

# ---- optimizer state dicts with smp v1's arguments ------------------------------------
for i in range(2):
    train_step(i)
    sched.step()
check(optimizer.param_groups[0]["lr"] == 0.025, f"lr {optimizer.param_groups[0]['lr']}")
own = optimizer.local_state_dict(gather_if_shard=False)
allp = optimizer.local_state_dict(gather_if_shard=True)  # collective over RDP_GROUP
names = [n for g in allp["_smp_param_names"] for n in g]
owned = set(own["_smp_owned"])
check(0 < len(owned) < len(names), f"owned {sorted(owned)} of {names}")
check({names[i] for i in own["state"]} == owned, "gather_if_shard=False holds the owned state")
check({names[i] for i in allp["state"]} == set(names), "gather_if_shard=True holds every state")
check("_smp_owned" not in allp, "no _smp_owned after gathering")
for i, st in own["state"].items():
    check(torch.equal(st["exp_avg"], allp["state"][i]["exp_avg"]), f"same state {names[i]}")
saved = copy.deepcopy(allp)
train_step(5)
optimizer.load_state_dict(saved)
after = optimizer.local_state_dict(gather_if_shard=True)
for i, st in saved["state"].items():
    check(torch.equal(st["exp_avg"], after["state"][i]["exp_avg"]), f"reloaded {names[i]}")

# ---- GradScaler: an inf on one tensor-parallel rank skips the step everywhere --------
scaler = smp.amp.GradScaler(init_scale=8.0)
before = [p.detach().clone() for p in model.local_parameters()]
train_step(6, scaler, poison=(r == 1))
check(all(torch.equal(a, p) for a, p in zip(before, model.local_parameters())),
      "the step was skipped on every rank")
check(scaler.get_scale() == 4.0, f"scale {scaler.get_scale()}")
train_step(7, scaler)
check(not all(torch.equal(a, p) for a, p in zip(before, model.local_parameters())),
      "a clean step updates")
check(smp.allgather(scaler.get_scale(), smp.WORLD) == [4.0] * 4, "one scale everywhere")

smp.pp_barrier(timeout=60)
smp.tp_barrier(timeout=60)
smp.rdp_barrier(timeout=60)
print(f"v1_api OK {r}", flush=True)
