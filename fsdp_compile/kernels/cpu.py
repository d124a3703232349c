"""The copies on real tensors written with torch's own ops (CPU, and tiny buckets on any device).

Owns: the three packing/unpacking routines on real tensors. Never touches torch.distributed,
custom-op registration (``ops.py``) or Triton (``triton_kernels.py``). These are the ops FSDP2's
copy-in/copy-out use:

- ``torch._chunk_cat(out=)`` when it fits the layout: it *is* the reduce-scatter layout (chunks
  of dim 0, rank-major, zero padded, cast into ``out``'s dtype), and with one chunk it is the
  all-gather slot of unpadded shards;
- ``torch.cat(out=)`` of the shards and views of one zero tensor for a padded slot;
- ``torch.split_with_sizes_copy(out=)`` for copy-out when every ``dim0`` divides by the world size;
- otherwise a per-param loop of at most two strided ``copy_`` calls, plus one ``_foreach_zero_``
  for all padding tails.

Every output is a new tensor (one allocation), every input byte is read once and every output
byte written once, with the dtype cast folded into the copy.
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import Tensor

from fsdp_compile.kernels._offsets import chunk_rows, padded_numels, prefix_offsets, row_numel

_dtype_of = operator.attrgetter("dtype")


def _chunk_cat_ok(tensors: Sequence[Tensor]) -> bool:
    """``torch._chunk_cat`` takes these: one dtype, at least 1-D, no empty dim 0."""
    return len(set(map(_dtype_of, tensors))) == 1 and min(map(Tensor.dim, tensors)) >= 1 and all(map(len, tensors))


def _split_rows(dim0: int, world_size: int) -> tuple[int, int, int]:
    """``(c, k, rem)``: chunk rows, ranks holding a full chunk, rows held by rank ``k``."""
    c = chunk_rows(dim0, world_size)
    k = dim0 // c if c else 0
    return c, k, dim0 - k * c


def all_gather_copy_in(shards: Sequence[Tensor], padded: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Pack ``shards`` (cast to ``dtype``) into one zero-padded slot of ``sum(padded)``."""
    padded = tuple(padded)
    out = torch.empty(sum(padded), dtype=dtype, device=shards[0].device)
    if tuple(map(Tensor.numel, shards)) == padded and _chunk_cat_ok(shards):
        torch._chunk_cat(shards, 0, 1, out=out.view(1, -1))  # no padding: flatten + cast + concat
        return out
    if len(shards) > 1 and all(map(Tensor.is_contiguous, shards)):
        zeros = torch.zeros(max(p - s.numel() for s, p in zip(shards, padded)), dtype=dtype, device=out.device)
        pieces = []
        for s, p in zip(shards, padded):
            pieces.append(s.view(-1))
            if s.numel() < p:
                pieces.append(zeros[: p - s.numel()])
        torch.cat(pieces, out=out)
        return out
    pads = []
    for s, off, p in zip(shards, prefix_offsets(padded), padded):
        n = s.numel()
        if n:
            out[off : off + n].view(s.shape).copy_(s)
        if n < p:
            pads.append(out[off + n : off + p])
    if pads:
        torch._foreach_zero_(pads)
    return out


def all_gather_copy_out(gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int, out: Sequence[Tensor]) -> None:
    """Unpack the rank-major ``W*T`` buffer into the new full tensors ``out`` (contiguous)."""
    padded = list(padded_numels(full_shapes, world_size))
    offs = prefix_offsets(padded)
    g2 = gathered.view(world_size, offs[-1])
    if all(s[0] % world_size == 0 for s in full_shapes):
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
    padded = padded_numels([g.shape for g in grads], world_size)
    offs = prefix_offsets(padded)
    out = torch.empty(world_size * offs[-1], dtype=dtype, device=grads[0].device)
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
