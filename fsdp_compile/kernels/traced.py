"""What a copy op becomes when it is traced (``torch.compile``, ``make_fx``, fake tensors).

The three copy ops are ``torch.library.triton_op``s (``ops.py``): AOTAutograd traces *into* them,
so the graph handed to the backend holds what this file returns, not the op itself. Eager calls
never come here.

Per device, ``lowering(device)`` picks (the backend's ``copies=`` option overrides it, through
:func:`lowering_for_trace` around its trace):

- ``"triton"`` (CUDA default): every copy is one ``wrap_triton`` launch (``triton_traced.py``; a
  ``triton_kernel_wrapper_functional`` node that Inductor compiles with the rest of the graph).
  Copy-ins read a list of tensors, which a trace cannot put in an address table, so their kernel
  takes every source as an argument of its own (one generated kernel per source count and dtype
  mix, up to 256 sources per launch).
- ``"fused"`` (CPU default): one opaque ``fsdp_compile::*_fused`` op per copy, whose body is the
  eager torch-op copy (``cpu.py``: ``torch._chunk_cat``, ``torch.cat``,
  ``torch.split_with_sizes_copy``). Kept because it is faster per step than
  ``"aten"`` on the 8x512 GPT (benchmarks/README.md, "What do the copy kernels cost").
- ``"aten"``: everything through ``aten.py``, any device: Inductor generates the copies itself
  and can fuse casts and gradient producers into them.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from fsdp_compile.kernels import aten

LOWERINGS = ("fused", "triton", "aten")
_chosen: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fsdp_compile_copies", default=None)


@contextlib.contextmanager
def lowering_for_trace(chosen: Optional[str]) -> Iterator[None]:
    """Trace the copy ops as ``chosen`` (one of ``LOWERINGS``; ``None``: by device) inside the block."""
    if chosen is not None and chosen not in LOWERINGS:
        raise ValueError(f"copies={chosen!r}; use one of {LOWERINGS} or 'auto'")
    token = _chosen.set(chosen)
    try:
        yield
    finally:
        _chosen.reset(token)


def lowering(device: torch.device) -> str:
    return _chosen.get() or ("triton" if device.type == "cuda" else "fused")


def all_gather_copy_in(shards: Sequence[Tensor], padded: Sequence[int], dtype: torch.dtype) -> Tensor:
    how = lowering(shards[0].device)
    if how == "fused":
        return torch.ops.fsdp_compile.all_gather_copy_in_fused(list(shards), list(padded), dtype)
    if how == "triton":
        return _triton().all_gather_copy_in(shards, padded, dtype)
    return aten.all_gather_copy_in(shards, padded, dtype)


def all_gather_copy_out(gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int) -> list[Tensor]:
    how = lowering(gathered.device)
    if how == "fused":
        from fsdp_compile.kernels._offsets import pack_shapes

        flat, ndims = pack_shapes(full_shapes)
        return list(torch.ops.fsdp_compile.all_gather_copy_out_fused(gathered, flat, ndims, world_size))
    if how == "triton":
        flat = _triton().all_gather_copy_out_flat(gathered, full_shapes, world_size)
        numels = [int(torch.Size(s).numel()) for s in full_shapes]
        return [piece.view(tuple(s)) for piece, s in zip(flat.split(numels), full_shapes)]
    return aten.all_gather_copy_out(gathered, full_shapes, world_size)


def reduce_scatter_copy_in(grads: Sequence[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    how = lowering(grads[0].device)
    if how == "fused":
        return torch.ops.fsdp_compile.reduce_scatter_copy_in_fused(list(grads), world_size, dtype)
    if how == "triton":
        return _triton().reduce_scatter_copy_in(grads, world_size, dtype)
    return aten.reduce_scatter_copy_in(grads, world_size, dtype)


def _triton():
    """``triton_traced`` (imported on first use: Triton is optional on CPU)."""
    from fsdp_compile.kernels import triton_traced

    return triton_traced
