"""smp v1 style manual partitioning and hooks: smp.set_partition on the
wrapped model's modules after smp.DistributedModel(...) (v1 partitions at the
first smp.step), register_post_partition_hook / register_post_step_hook
called with (model, optimizer), model.module.module being the user's model
with ddp, then training against plain PyTorch. Needs "auto_partition": False.
Prints "v1_partition_hooks OK <rank>"."""

import torch
import torch.nn.functional as F
import torch.optim as optim

import smdistributed.modelparallel.torch as smp
from v1_common import Net, Reference, batches, check_close, device

calls = []


@smp.step
def train_step(model, data, target):
    output = model(data)
    loss = F.nll_loss(output, target, reduction="mean")
    model.backward(loss)
    return output, loss


def main():
    smp.init()
    dev = device()
    reference = Reference(dev).run()
    torch.manual_seed(1)
    with smp.tensor_parallelism(enabled=smp.tp_size() > 1):
        net = Net()
    model = smp.DistributedModel(net)
    assert not model.partitioned
    inner = model.module.module if smp.config()["ddp"] else model.module
    assert inner is net and model.get_module() is net, (type(model.module), type(inner))
    # Not what automatic partitioning would pick: fc1 alone on stage 0.
    stages = {2: [0, 1, 1, 1], 4: [0, 1, 2, 3]}[smp.pp_size()]
    for name, stage in zip(["fc1", "fc2", "fc3", "fc4"], stages):
        smp.set_partition(getattr(model.get_module(), name), stage)

    def after_partition(m, opt):
        local = sorted({n.split(".")[0] for n, _ in m.local_named_parameters()})
        expected = [n for n, s in zip(["fc1", "fc2", "fc3", "fc4"], stages) if s == smp.pp_rank()]
        assert m is model and m.partitioned, m
        assert opt is optimizer, opt
        assert local == expected, (local, expected)
        calls.append("partition")

    def after_step(m, opt):
        assert m is model and opt is optimizer
        calls.append("step")

    model.register_post_partition_hook(after_partition)
    model.register_post_step_hook(after_step)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = smp.DistributedOptimizer(optimizer)
    model.to(dev)
    for batch_idx, (data, target) in enumerate(batches(dev)):
        optimizer.zero_grad()
        _, loss_mb = train_step(model, data, target)
        optimizer.step()
        assert calls == ["partition", "step"], calls
        loss = loss_mb.reduce_mean()
        check_close(f"loss of step {batch_idx}", loss.item(), reference.losses[batch_idx])
    try:
        smp.set_partition(model.get_module().fc4, 0)
        raise AssertionError("set_partition after partitioning did not raise")
    except smp.StateError as e:
        assert "already partitioned" in str(e), e
    # Registered after the first step (and with an optimizer): runs at once.
    model.register_post_step_hook(lambda m, opt: calls.append("late"))
    assert calls == ["partition", "step", "late"], calls
    print(f"v1_partition_hooks OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
