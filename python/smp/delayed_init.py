"""smp.delay_param_initialization: smp v1's context for building models too
large to initialize on one device.

    with smp.delay_param_initialization(enabled=True):
        model = MyModel(config)
    model = smp.DistributedModel(model)

In smp v1, parameters created inside are allocated only when
smp.DistributedModel places each on its partition. Here the context is
accepted and parameters are allocated and initialized as usual, on the
device the module's code chooses (the CPU by default): build large models
on the CPU, wrap them, then move them (``model.to(device)`` moves only this
pipeline stage's tensors; the other stages' are released at wrapping), so a
device never holds more than its stage. The results are the same as without
the context.
"""

import contextlib

from smp import _C


@contextlib.contextmanager
def delay_param_initialization(enabled=True):
    """See the module docstring. ``enabled`` must be a bool."""
    if not isinstance(enabled, bool):
        raise _C.ConfigError(
            f"smp.delay_param_initialization: enabled must be True or False, got {enabled!r}")
    yield
