"""smp v1 style training loop that reads the loss on pipeline rank 0 only
(`if smp.pp_rank() == 0: loss = loss_mb.reduce_mean()`), the stage that does
not compute it. Prints "v1_train_pp_rank0 OK <rank>"."""

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
        output_mb, loss_mb = train_step(model, data, target)
        optimizer.step()
        if smp.pp_rank() == 0:
            loss = loss_mb.reduce_mean()
            check_close(f"loss of step {batch_idx}", loss.item(), reference.losses[batch_idx])
            check_close(f"output of step {batch_idx}", output_mb.concat(),
                        reference.outputs[batch_idx])
            if smp.rank() == 0:
                print(f"Train step {batch_idx} loss {loss.item():.6f}", flush=True)
    print(f"v1_train_pp_rank0 OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
