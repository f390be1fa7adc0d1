"""smp.amp: mixed precision with smp (smp v1's smp.amp).

    scaler = smp.amp.GradScaler()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = train_step(model, x, y)      # scaler.scale(loss) inside, then model.backward
    scaler.step(optimizer)
    scaler.update()
"""

from smp.amp.grad_scaler import GradScaler

__all__ = ["GradScaler"]
