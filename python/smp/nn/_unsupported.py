"""smp v1 smp.nn classes that smp does not implement. Each raises
smp.NotSupportedError naming the alternative when constructed (instead of an
AttributeError on the name); smp.nn defines them unless a real one exists."""

from smp._compat import unsupported_class

STUBS = {
    "FlashAttentionLayer": unsupported_class(
        "smp.nn.FlashAttentionLayer",
        "compute attention with torch.nn.functional.scaled_dot_product_attention (it picks a "
        "flash kernel on the GPU), or use smp.nn.DistributedTransformerLayer"),
    "DistributedTransformerOutputLayer": unsupported_class(
        "smp.nn.DistributedTransformerOutputLayer",
        "use smp.nn.DistributedTransformerLayer (whose .output is this block), or two "
        "smp.nn.DistributedLinear layers"),
}
