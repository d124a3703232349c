"""Copy-in/copy-out for FSDP communication buffers: pack shards into the all-gather slot, unpack
the gathered buffer into full tensors, pack full gradients for the reduce-scatter.

Owns the public surface of ``fsdp_compile.kernels``: the wrappers over the ``fsdp_compile::`` ops
(``ops.py``: ``triton_op``s, so torch.compile traces into them). Eager kernels: ``cpu.py``
(torch's own ops: CPU, and tiny buckets anywhere) and ``triton_kernels.py`` (one launch per op,
CUDA). Traced calls: ``traced.py`` picks a ``wrap_triton`` launch (``triton_traced.py``), one
opaque op running ``cpu.py``, or the ATen decomposition (``aten.py``).
"""

from fsdp_compile.kernels.ops import (
    TRITON_MIN_NUMEL,
    all_gather_copy_in,
    all_gather_copy_out,
    eager_kernels,
    reduce_scatter_copy_in,
)

__all__ = [
    "TRITON_MIN_NUMEL",
    "all_gather_copy_in",
    "all_gather_copy_out",
    "eager_kernels",
    "reduce_scatter_copy_in",
]
