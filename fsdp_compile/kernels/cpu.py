"""Fused copy-in/copy-out on CPU tensors (and the small-bucket path on any device).

Owns: the four packing/unpacking routines on real tensors. Never touches torch.distributed,
custom-op registration (``ops.py``) or Triton (``triton_kernels.py``).

"Fused" here means: one output allocation (large CPU ones reused across calls, see ``_pool``),
every input byte read once and every output byte written once, the dtype cast folded into the
copy, and only padding tails zeroed. Two implementations, chosen per call:

- the C++ extension (``cpu_ext``, CPU tensors, the default): one call per op whatever the tensor
  count, segments built in C++, copied with ``torch.get_num_threads()`` threads;
- torch ops (other devices, or without the extension): ``torch._chunk_cat(out=)`` when it fits
  the layout (it *is* the reduce-scatter layout; with one chunk it is the unpadded all-gather
  slot), ``torch.cat(out=)`` of the shards and views of one zero tensor for a padded slot,
  ``torch.split_with_sizes_copy(out=)`` for copy-out when every ``dim0`` divides by the world
  size, and otherwise a per-param loop of at most two strided ``copy_`` calls plus one
  ``_foreach_zero_`` for all padding tails.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from fsdp_compile.kernels import _pool, cpu_ext
from fsdp_compile.kernels import _offsets
from fsdp_compile.kernels._offsets import chunk_rows, pack_shapes, prefix_offsets, row_numel, unpack_shapes

_dtype_of = operator.attrgetter("dtype")


def _ext(device: torch.device):
    return cpu_ext.module() if device.type == "cpu" else None


def _chunk_cat_ok(tensors: Sequence[Tensor]) -> bool:
    """``torch._chunk_cat`` takes these: one dtype, at least 1-D, no empty dim 0."""
    return len(set(map(_dtype_of, tensors))) == 1 and min(map(Tensor.dim, tensors)) >= 1 and all(map(len, tensors))


def _split_rows(dim0: int, world_size: int) -> tuple[int, int, int]:
    """``(c, k, rem)``: chunk rows, ranks holding a full chunk, rows held by rank ``k``."""
    c = chunk_rows(dim0, world_size)
    k = dim0 // c if c else 0
    return c, k, dim0 - k * c


def all_gather_copy_in(
    shards: Sequence[Tensor], padded_numels: Sequence[int], dtype: torch.dtype, defer_if_grad: bool = False
) -> Optional[Tensor]:
    """Pack ``shards`` (cast to ``dtype``) into one zero-padded slot of ``sum(padded_numels)``.

    ``defer_if_grad`` (C++ extension only): return ``None``, copying nothing, when autograd would
    record the op, so the caller can go through the dispatcher; the extension finds out while
    reading the list, which costs less than a Python loop over 1000 tensors."""
    out = _pool.empty(sum(padded_numels), dtype, shards[0].device)
    ext = _ext(out.device)
    if ext is not None:
        # The extension checks numel <= padded per shard.
        return out if ext.all_gather_copy_in(shards, padded_numels, out, defer_if_grad) else None
    padded_numels = tuple(padded_numels)
    offs = prefix_offsets(padded_numels)
    if tuple(map(Tensor.numel, shards)) == padded_numels and _chunk_cat_ok(shards):
        torch._chunk_cat(shards, 0, 1, out=out.view(1, -1))  # no padding: flatten + cast + concat
        return out
    if len(shards) > 1 and all(map(Tensor.is_contiguous, shards)):
        zeros = torch.zeros(max(p - s.numel() for s, p in zip(shards, padded_numels)), dtype=dtype, device=out.device)
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
    gathered: Tensor,
    full_shapes: Sequence[Sequence[int]],
    world_size: int,
    out: Sequence[Tensor],
    packed: Optional[tuple[list[int], list[int]]] = None,
) -> None:
    """Unpack the rank-major ``W*T`` buffer into the preallocated full tensors ``out``
    (``packed``: ``pack_shapes(full_shapes)`` if the caller has it)."""
    contiguous = all(map(Tensor.is_contiguous, out))
    ext = _ext(gathered.device)
    if ext is not None and contiguous:
        ext.all_gather_copy_out(gathered, out, world_size, *(packed or pack_shapes(full_shapes)))
        return
    padded = list(_offsets.padded_numels(full_shapes, world_size))
    offs = prefix_offsets(padded)
    g2 = gathered.view(world_size, offs[-1])
    if contiguous and all(s[0] % world_size == 0 for s in full_shapes):
        torch.split_with_sizes_copy(g2, padded, dim=1, out=[o.view(world_size, -1) for o in out])
        return
    for shape, off, o in zip(full_shapes, offs, out):
        c, k, rem = _split_rows(shape[0], world_size)
        rn, rest = row_numel(shape), tuple(shape[1:])
        if k:
            o[: k * c].unflatten(0, (k, c)).copy_(g2[:k, off : off + c * rn].view((k, c) + rest))
        if rem:
            o[k * c :].copy_(g2[k, off : off + rem * rn].view((rem,) + rest))


def all_gather_copy_out_new(gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int) -> list[Tensor]:
    """New full tensors (shapes packed as in the op schema) unpacked from ``gathered``."""
    ext = _ext(gathered.device)
    if ext is not None:
        return ext.all_gather_copy_out_new(gathered, flat_shapes, ndims, world_size)
    shapes = unpack_shapes(flat_shapes, ndims)
    out = [torch.empty(s, dtype=gathered.dtype, device=gathered.device) for s in shapes]
    all_gather_copy_out(gathered.reshape(-1), shapes, world_size, out)
    return out


def reduce_scatter_copy_in(
    grads: Sequence[Tensor], world_size: int, dtype: torch.dtype, defer_if_grad: bool = False
) -> Optional[Tensor]:
    """Pack full gradients rank-major (``torch._chunk_cat`` layout, zero padded) into ``W*T``.
    ``defer_if_grad``: as for :func:`all_gather_copy_in`."""
    device = grads[0].device
    ext = _ext(device)
    if ext is not None:
        return ext.reduce_scatter_copy_in(grads, world_size, lambda numel: _pool.empty(numel, dtype, device), defer_if_grad)
    padded = _offsets.padded_numels([g.shape for g in grads], world_size)
    offs = prefix_offsets(padded)
    out = _pool.empty(world_size * offs[-1], dtype, grads[0].device)
    o2 = out.view(world_size, offs[-1])
    if _chunk_cat_ok(grads):
        torch._chunk_cat(grads, 0, world_size, out=o2)  # this layout, cast into out's dtype
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
