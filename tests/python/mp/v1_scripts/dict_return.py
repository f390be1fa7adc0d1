"""A step function that returns a dict (as a Hugging Face style model output
is read): `out["loss"].reduce_mean()` on rank 0, `out["logits"].concat()` on
every rank, and a nested list / Python value beside them. Prints
"v1_dict_return OK <rank>"."""

import torch
import torch.nn.functional as F
import torch.optim as optim

import smdistributed.modelparallel.torch as smp
from v1_common import Net, Reference, batches, check_close, device


@smp.step
def train_step(model, data, target):
    logits = model(data)
    loss = F.nll_loss(logits, target, reduction="mean")
    model.backward(loss)
    return {"loss": loss, "logits": logits, "extra": [loss.detach() * 2, "tag"]}

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
    microbatches = smp.config()["microbatches"]
    for batch_idx, (data, target) in enumerate(batches(dev)):
        optimizer.zero_grad()
        out = train_step(model, data, target)
        optimizer.step()
        assert isinstance(out, dict) and sorted(out) == ["extra", "logits", "loss"], out
        assert isinstance(out["extra"], list) and out["extra"][1] == ["tag"] * microbatches
        check_close(f"logits of step {batch_idx}", out["logits"].concat(),
                    reference.outputs[batch_idx])
        check_close("extra", out["extra"][0].reduce_mean().item(),
                    2 * reference.losses[batch_idx])
        if smp.rank() == 0:
            loss = out["loss"].reduce_mean()
            print(f"Train step {batch_idx} loss {loss.item():.6f}", flush=True)
            check_close(f"loss of step {batch_idx}", loss.item(), reference.losses[batch_idx])
    print(f"v1_dict_return OK {smp.rank()}", flush=True)


if __name__ == "__main__":
    main()
