"""The one registration every fused op goes through, so a new op is a kernel, a reference and one
`FusedOp(...)` (plus `.differentiable(...)` when it has a backward).

A FusedOp is a torch custom op torch.ops.fastdiss.NAME whose CUDA kernel is the Triton launcher and
whose CPU kernel is the PyTorch reference (or the launcher under the Triton interpreter with backend
'triton'), with a fake (shape-only) implementation for torch.compile / torch.export. An op with a
backward gets one autograd formula, used twice: by the custom op (what torch.compile traces) and by
a plain autograd.Function over the launchers (what eager CUDA calls use: the Python custom op's
dispatch and autograd wrapper cost ~0.1 ms of host time per forward and ~0.3 ms per forward+backward
on an H200 host, more than the kernels at the model's sizes). The formula calls backward
FusedOps with `eager=ctx.eager`, so each path stays on its own kind of call.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _backend


class FusedOp:
    """torch.ops.fastdiss.<name> from a launcher (`kernel`), its PyTorch `reference` (same signature
    and outputs) and `fake` (outputs' shapes and dtypes). `schema` is the op's torch schema, e.g.
    "(Tensor x, float eps) -> (Tensor, Tensor)"; `device_arg` is the index of the argument whose
    device picks the CPU implementation."""

    def __init__(self, name: str, schema: str, *, kernel: Callable, reference: Callable, fake: Callable,
                 device_arg: int = 0):
        self.name, self.kernel, self.reference, self.device_arg = name, kernel, reference, device_arg
        self.op = torch.library.custom_op(f"fastdiss::{name}", self._cuda, mutates_args=(), device_types="cuda",
                                          schema=schema)
        self.op.register_kernel("cpu")(self._cpu)
        self.op.register_fake(fake)
        self.function = None

    # the kernel is looked up at call time, so tests can wrap it to see which path ran
    def _cuda(self, *args):
        return self.kernel(*args)

    def _cpu(self, *args):
        if _backend.use_triton(args[self.device_arg]):
            return self.kernel(*args)
        return self.reference(*args)

    def __call__(self, *args, eager: bool = False):
        """The launcher itself (eager=True, inside the eager autograd.Function) or the op."""
        return self.kernel(*args) if eager else self.op(*args)

    def differentiable(self, setup_context: Callable, backward: Callable) -> "FusedOp":
        """Register the autograd formula: setup_context(ctx, inputs, output) saves what
        backward(ctx, *output_grads) needs; backward returns one gradient (or None) per input."""
        def op_setup_context(ctx, inputs, output):
            ctx.eager = False
            setup_context(ctx, inputs, output)

        self.op.register_autograd(backward, setup_context=op_setup_context)
        fused = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = fused.kernel(*args)
                ctx.eager = True
                setup_context(ctx, args, output)
                return output

        Function.backward = staticmethod(backward)
        Function.__name__ = Function.__qualname__ = f"{self.name}_function"   # grad_fn names the op
        self.function = Function
        return self

    def apply(self, *args):
        """What the public functions call: the autograd.Function in eager mode on CUDA, else the op
        (CPU tensors, and always under torch.compile, which traces the op)."""
        if self.function is not None and args[self.device_arg].is_cuda and not torch.compiler.is_compiling():
            return self.function.apply(*args)
        return self.op(*args)
