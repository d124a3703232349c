"""The three copy ops written as plain ATen ops (pad, cat, view): what Inductor compiles itself.

Owns: a decomposition of each op that traces under fake/functional tensors and needs nothing but
shapes. Used by ``traced.py`` for the ``"aten"`` lowering (``fsdp_compile.backend(copies="aten")``):
Inductor then generates the copy kernels itself and can fuse the casts and the producers of the
gradients into them.

Why padding only at the end works: a parameter's rank-major pieces are its dim-0 chunks in rank
order, and only the trailing ranks are short, so "pad the flattened parameter to ``W*P`` and view
it as ``(W, P)``" is exactly its column of the rank-major buffer (and the inverse for copy-out).
Results are never views of an input (custom-op outputs must not alias inputs).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fsdp_compile.kernels._offsets import padded_numels, prefix_offsets


def _pad_to(flat: Tensor, numel: int) -> Tensor:
    return F.pad(flat, (0, numel - flat.numel())) if flat.numel() < numel else flat


def all_gather_copy_in(shards: Sequence[Tensor], padded: Sequence[int], dtype: torch.dtype) -> Tensor:
    return torch.cat([_pad_to(s.reshape(-1).to(dtype), p) for s, p in zip(shards, padded)])


def all_gather_copy_out(gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int) -> list[Tensor]:
    padded = padded_numels(full_shapes, world_size)
    offs = prefix_offsets(padded)
    g2 = gathered.reshape(world_size, offs[-1])
    outs = []
    for shape, off, p in zip(full_shapes, offs, padded):
        # clone(): the one copy, and the result never aliases ``gathered`` (a reshape may view it).
        column = g2[:, off : off + p].clone()
        outs.append(column.reshape(-1)[: math.prod(shape)].view(tuple(shape)))
    return outs


def reduce_scatter_copy_in(grads: Sequence[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    padded = padded_numels([g.shape for g in grads], world_size)
    columns = [_pad_to(g.reshape(-1).to(dtype), world_size * p).view(world_size, p) for g, p in zip(grads, padded)]
    return torch.cat(columns, dim=1).reshape(-1)
