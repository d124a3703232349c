"""Fused copy-in/copy-out kernels for FSDP communication buffers.

Owns the public surface of ``fsdp_compile.kernels``: wrappers over the ``fsdp_compile::`` ops
(``ops.py``: ``triton_op``s, so torch.compile traces into them) and the :func:`use_triton` switch.
Eager implementations: ``cpu.py`` (torch ops, CPU and tiny buckets) and ``triton_kernels.py`` (one
launch per op, CUDA or ``TRITON_INTERPRET=1``). Traced calls: ``traced.py`` picks a ``wrap_triton``
launch, the ATen decomposition (``aten.py``) or one opaque fused op, by device.
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
