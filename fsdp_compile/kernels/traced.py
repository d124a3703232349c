"""What a copy op becomes when it is traced (``torch.compile``, ``make_fx``, fake tensors).

The four functional copy ops are ``torch.library.triton_op``s (``ops.py``): AOTAutograd traces
*into* them, so the graph handed to the backend holds what this file returns, not an opaque call.
Eager calls never come here (they run ``cpu.py`` or the address-table Triton kernel directly).

Per device, ``lowering(device)`` picks (``FSDP_COMPILE_TRACED_KERNELS`` overrides it):

- ``"fused"`` (CPU default): one opaque ``fsdp_compile::*_fused`` op per copy, which runs the
  C++ kernels (``cpu.py``). Measured on the README GPT (``benchmarks/step.py``), letting Inductor
  generate the copies instead (``"aten"``) gave the same step time within run-to-run noise,
  0.3-0.75 MiB more peak memory and 11 s more compile; the pooled buffers (``_pool``) also only
  exist on this path.
- ``"triton"`` (CUDA default): every copy is one ``wrap_triton`` launch
  (``triton_traced.py``; a ``triton_kernel_wrapper_functional`` node that Inductor compiles with
  the rest of the graph). Copy-ins read a list of tensors, which a trace cannot put in an address
  table, so their kernel takes every source as an argument of its own (one generated kernel per
  source count and dtype mix, up to 256 sources per launch).
- ``"aten"``: everything through ``aten.py``, any device: Inductor generates the copies itself
  and can fuse casts and gradient producers into them (on the README GPT on CPU: same step time
  as ``"fused"``, more memory and compile time). The tests use it to run the graph passes on
  chains of plain ATen ops.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from fsdp_compile.kernels import aten

LOWERINGS = ("fused", "triton", "aten")


def lowering(device: torch.device) -> str:
    chosen = os.environ.get("FSDP_COMPILE_TRACED_KERNELS") or ("triton" if device.type == "cuda" else "fused")
    if chosen not in LOWERINGS:
        raise ValueError(f"FSDP_COMPILE_TRACED_KERNELS={chosen!r}; use one of {LOWERINGS}")
    return chosen


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


def reduce_scatter_copy_out_new(slot: Tensor, dtype: torch.dtype) -> Tensor:
    how = lowering(slot.device)
    if how == "fused":
        return torch.ops.fsdp_compile.reduce_scatter_copy_out_new_fused(slot, dtype)
    if how == "triton":
        return _triton().reduce_scatter_copy_out_new(slot, dtype)
    return aten.reduce_scatter_copy_out_new(slot, dtype)


def _triton():
    """``triton_traced`` (imported on first use: Triton is optional on CPU)."""
    from fsdp_compile.kernels import triton_traced

    return triton_traced
