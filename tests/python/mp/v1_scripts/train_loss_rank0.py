"""smp v1 style training loop whose loss is read with reduce_mean() and
printed on world rank 0 only: no other rank touches the StepOutput.
Prints "v1_train_rank0 OK <rank>"."""

import torch
import torch.nn.functional as F
import torch.optim as optim

import smdistributed.modelparallel.torch as smp
from v1_common import Net, Reference, batches, check_close, device


@smp.step
def train_step(model, data, target):
    output = model(data)
    loss = F.nll_loss(output, target, reduction="mean")
    model.backward(loss)
    return output, loss

def build(dev):
    torch.manual_seed(1)
    with smp.tensor_parallelism(enabled=smp.tp_size() > 1):
        model = Net()
    model = smp.DistributedModel(model)
    model.to(dev)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = smp.DistributedOptimizer(optimizer)
    return model, optimizer


def main():
    smp.init()
    dev = device()
    reference = Reference(dev).run()
    model, optimizer = build(dev)
    model.train()
    for batch_idx, (data, target) in enumerate(batches(dev)):
        optimizer.zero_grad()
        _, loss_mb = train_step(model, data, target)
        if smp.rank() == 0:
            loss = loss_mb.reduce_mean()
            print(f"Train step {batch_idx} loss {loss.item():.6f}", flush=True)
            check_close(f"loss of step {batch_idx}", loss.item(), reference.losses[batch_idx])
        optimizer.step()
    print(f"v1_train_rank0 OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
