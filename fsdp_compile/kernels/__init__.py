"""Fused copy-in/copy-out kernels for FSDP communication buffers.

Owns the public surface of ``fsdp_compile.kernels``: four wrappers over the ``fsdp_compile::``
custom ops (``ops.py``) and the :func:`use_triton` switch. Implementations: ``cpu.py`` (torch ops,
CPU and tiny buckets) and ``triton_kernels.py`` (one launch per op, CUDA or ``TRITON_INTERPRET=1``).
"""

from fsdp_compile.kernels.ops import (
    TRITON_MIN_NUMEL,
    all_gather_copy_in,
    all_gather_copy_out,
    reduce_scatter_copy_in,
    reduce_scatter_copy_out,
    reduce_scatter_copy_out_new,
    use_triton,
)

__all__ = [
    "TRITON_MIN_NUMEL",
    "all_gather_copy_in",
    "all_gather_copy_out",
    "reduce_scatter_copy_in",
    "reduce_scatter_copy_out",
    "reduce_scatter_copy_out_new",
    "use_triton",
]
