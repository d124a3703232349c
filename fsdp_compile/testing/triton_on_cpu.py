"""Run compiled graphs that hold ``wrap_triton`` launches on a machine without a GPU.

``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors, but it also makes ``@triton.jit``
return an interpreted function, which ``torch.library.wrap_triton`` passes through untraced: a
compiled graph then never holds the ``triton_kernel_wrapper_functional`` node CUDA gets. Here
``@triton.jit`` stays as it is (so tracing, the graph passes and Triton's own TTIR analysis see
exactly what they see on CUDA), and only the *launch* goes through Triton's interpreter:
``JITFunction.run`` (a grid launch) and ``JITFunction.__call__`` (a ``@triton.jit`` helper called
from a kernel) are redirected to ``triton.runtime.interpreter.InterpretedFunction`` of the same
Python function, for the duration of the context.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def triton_launches_interpreted() -> Iterator[None]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted: dict[int, InterpretedFunction] = {}

    def as_interpreted(kernel: JITFunction) -> InterpretedFunction:
        if id(kernel) not in interpreted:
            interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
        return interpreted[id(kernel)]

    def run(self, *args, grid, warmup=False, **kwargs):
        return as_interpreted(self).run(*args, grid=grid, warmup=warmup, **kwargs)

    def call(self, *args, **kwargs):
        return as_interpreted(self)(*args, **kwargs)

    saved = JITFunction.run, JITFunction.__call__
    JITFunction.run, JITFunction.__call__ = run, call
    try:
        yield
    finally:
        JITFunction.run, JITFunction.__call__ = saved


@contextlib.contextmanager
def compiling_for_cuda(capability: int = 80) -> Iterator[None]:
    """Triton's active driver reports a CUDA target of this compute capability, so its compiler
    (and torch's TTIR analysis of ``wrap_triton`` kernels, which asks the driver for the target)
    runs for CUDA on a machine without a GPU. Nothing can be launched meanwhile."""
    import triton
    from triton.backends.compiler import GPUTarget

    class CompileOnlyCudaDriver:
        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def is_active(self):
            return True

    config = triton.runtime.driver
    saved = config._active  # reset_active() would look for a real driver, and there is none
    config.set_active(CompileOnlyCudaDriver())
    try:
        yield
    finally:
        config._active = saved
