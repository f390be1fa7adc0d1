"""smp v1 style evaluation: `outputs = eval_step(model, data); preds =
outputs.concat()` on every rank, after two training steps, under
torch.no_grad(). Prints "v1_evaluate OK <rank>"."""

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


@smp.step
def eval_step(model, data):
    return model(data)

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
    reference = Reference(dev)
    model, optimizer = build(dev)
    data_iter = batches(dev)
    for batch_idx in range(2):
        data, target = next(data_iter)
        reference.train_step()
        optimizer.zero_grad()
        train_step(model, data, target)
        optimizer.step()
    model.eval()
    data, target = next(data_iter)
    reference.train_step()  # records the outputs before its update
    with torch.no_grad():
        outputs = eval_step(model, data)
        preds = outputs.concat()
    check_close("evaluation outputs", preds, reference.outputs[-1])
    correct = preds.argmax(dim=1).eq(target).sum().item()
    if smp.rank() == 0:
        print(f"Test accuracy {correct}/{len(target)}", flush=True)
    print(f"v1_evaluate OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
