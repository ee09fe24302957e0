"""fastdiss.kernels: fused Triton kernels registered as torch custom ops.

One module per op; each holds the Triton kernel(s), the host launcher, the pure-PyTorch
reference (the CPU kernel, the test oracle and the benchmark baseline) and the op registration.
Importing this package registers the ops under torch.ops.fastdiss.
"""
from . import attention, layer_norm, noising, rounding_ce, self_cond_proj  # noqa: F401
