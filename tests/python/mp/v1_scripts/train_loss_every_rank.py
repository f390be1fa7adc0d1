"""smp v1 style training loop that reads the loss on every rank, with
reduce_mean() and reduce_sum(), in a different order on different ranks, and
calls outputs / stack() / __getitem__ / map too. Prints
"v1_train_every_rank OK <rank>"."""

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
    microbatches = smp.num_microbatches() if hasattr(smp, "num_microbatches") else \
        smp.config()["microbatches"]
    for batch_idx, (data, target) in enumerate(batches(dev)):
        optimizer.zero_grad()
        output_mb, loss_mb = train_step(model, data, target)
        if smp.rank() % 2 == 0:
            loss = loss_mb.reduce_mean()
            total = loss_mb.reduce_sum()
        else:
            total = loss_mb.reduce_sum()
            loss = loss_mb.reduce_mean()
        optimizer.step()
        check_close(f"loss of step {batch_idx}", loss.item(), reference.losses[batch_idx])
        check_close(f"summed loss of step {batch_idx}", total.item() / microbatches,
                    reference.losses[batch_idx])
        assert len(loss_mb.outputs) == microbatches and len(output_mb) == microbatches
        assert output_mb.stack().shape[0] == microbatches
        check_close("loss_mb[0]", loss_mb[0].item(), loss_mb.outputs[0].item())
        check_close("map", loss_mb.map(lambda t: t * 2).reduce_mean().item(), 2 * loss.item())
        if smp.rank() == 0:
            print(f"Train step {batch_idx} loss {loss.item():.6f}", flush=True)
    print(f"v1_train_every_rank OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
