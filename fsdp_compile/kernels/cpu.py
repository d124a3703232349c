"""Fused copy-in/copy-out with plain torch ops (the CPU path, and the small-bucket path anywhere).

Owns: the four packing/unpacking routines on real tensors. Never touches torch.distributed,
custom-op registration (``ops.py``) or Triton (``triton_kernels.py``).

"Fused" here means: one output allocation (large CPU ones reused across calls, see ``_pool``),
every input byte read once and every output byte written once, the dtype cast folded into the
copy, and only padding tails zeroed. No per-tensor pad/cat temporaries. Two shapes of code, chosen per call:

- batched (one C++ op for all tensors, so Python overhead does not grow with the tensor count):
  ``torch.cat(out=)`` for all-gather copy-in of contiguous shards (padding comes from views of one
  small zero tensor), ``torch.split_with_sizes_copy(out=)`` / ``torch._chunk_cat(out=)`` for
  copy-out / reduce-scatter copy-in when every ``dim0`` divides by the world size (no padding);
- per-param loop otherwise: at most two strided ``copy_`` calls into views of the output (ranks
  holding a full chunk in one 2-D copy, the last partial rank in another) plus one
  ``_foreach_zero_`` for all padding tails.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fsdp_compile.kernels import _pool
from fsdp_compile.kernels._offsets import chunk_rows, prefix_offsets, row_numel


def _split_rows(dim0: int, world_size: int) -> tuple[int, int, int]:
    """``(c, k, rem)``: chunk rows, ranks holding a full chunk, rows held by rank ``k``."""
    c = chunk_rows(dim0, world_size)
    k = dim0 // c if c else 0
    return c, k, dim0 - k * c


def all_gather_copy_in(shards: Sequence[Tensor], padded_numels: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Pack ``shards`` (cast to ``dtype``) into one zero-padded slot of ``sum(padded_numels)``."""
    offs = prefix_offsets(padded_numels)
    out = _pool.empty(offs[-1], dtype, shards[0].device)
    if len(shards) > 1 and all(s.is_contiguous() for s in shards):
        max_pad = max(p - s.numel() for s, p in zip(shards, padded_numels))
        zeros = torch.zeros(max_pad, dtype=dtype, device=out.device)
        pieces = []
        for s, p in zip(shards, padded_numels):
            pieces.append(s.view(-1))
            if s.numel() < p:
                pieces.append(zeros[: p - s.numel()])
        torch.cat(pieces, out=out)
        return out
    pads = []
    for s, off, p in zip(shards, offs, padded_numels):
        n = s.numel()
        if n:
            out[off : off + n].view(s.shape).copy_(s)
        if n < p:
            pads.append(out[off + n : off + p])
    if pads:
        torch._foreach_zero_(pads)
    return out


def all_gather_copy_out(
    gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int, out: Sequence[Tensor]
) -> None:
    """Unpack the rank-major ``W*T`` buffer into the preallocated full tensors ``out``."""
    padded = [chunk_rows(s[0], world_size) * row_numel(s) for s in full_shapes]
    offs = prefix_offsets(padded)
    g2 = gathered.view(world_size, offs[-1])
    if all(s[0] % world_size == 0 for s in full_shapes) and all(o.is_contiguous() for o in out):
        torch.split_with_sizes_copy(g2, padded, dim=1, out=[o.view(world_size, -1) for o in out])
        return
    for shape, off, o in zip(full_shapes, offs, out):
        c, k, rem = _split_rows(shape[0], world_size)
        rn, rest = row_numel(shape), tuple(shape[1:])
        if k:
            o[: k * c].unflatten(0, (k, c)).copy_(g2[:k, off : off + c * rn].view((k, c) + rest))
        if rem:
            o[k * c :].copy_(g2[k, off : off + rem * rn].view((rem,) + rest))


def reduce_scatter_copy_in(grads: Sequence[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    """Pack full gradients rank-major (``torch._chunk_cat`` layout, zero padded) into ``W*T``."""
    padded = [chunk_rows(g.shape[0], world_size) * row_numel(g.shape) for g in grads]
    offs = prefix_offsets(padded)
    out = _pool.empty(world_size * offs[-1], dtype, grads[0].device)
    o2 = out.view(world_size, offs[-1])
    if all(g.shape[0] and g.shape[0] % world_size == 0 and g.dtype == grads[0].dtype for g in grads):
        torch._chunk_cat(grads, 0, world_size, out=o2)
        return out
    pads = []
    for g, off, p in zip(grads, offs, padded):
        c, k, rem = _split_rows(g.shape[0], world_size)
        rn, rest = row_numel(g.shape), tuple(g.shape[1:])
        if k:
            o2[:k, off : off + p].view((k, c) + rest).copy_(g[: k * c].unflatten(0, (k, c)))
        if rem:
            o2[k, off : off + rem * rn].view((rem,) + rest).copy_(g[k * c :])
            pads.append(o2[k, off + rem * rn : off + p])
        first_empty = k + (1 if rem else 0)
        if p and first_empty < world_size:
            pads.append(o2[first_empty:, off : off + p])
    if pads:
        torch._foreach_zero_(pads)
    return out


def reduce_scatter_copy_out(slot: Tensor, flat_grad: Tensor, accumulate: bool) -> None:
    """``flat_grad = cast(slot)`` or ``flat_grad += cast(slot)`` (added in ``flat_grad.dtype``)."""
    if accumulate:
        flat_grad.add_(slot)
    else:
        flat_grad.copy_(slot)
