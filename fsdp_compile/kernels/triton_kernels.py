"""Eager Triton copy-in/copy-out kernels: one launch per op for any number of tensors of any dtypes.

Owns: the address-table kernel ``_segment_copy_kernel``, its three eager launchers, and the
``@triton.jit`` helpers every copy kernel shares (``_cast``, ``_find_segment``, ``_copy_block``,
``_segment_table``). The traceable kernels (``wrap_triton``) live in ``triton_traced.py``. Never
touches custom-op registration (``ops.py``) or offsets beyond ``_offsets.py``.

Design: every op is a list of *segments* ``(src address, src dtype, dst address, copy_len,
total_len)``: the kernel copies ``copy_len`` elements (casting to the destination dtype) and
writes zeros for ``[copy_len, total_len)`` (the padding); the source dtype is a per-segment branch, so mixed dtypes need no second launch. Segments are found per program
through a prefix-sum table of blocks per segment (binary search in the kernel), so one launch
covers all tensors. Addresses are ``data_ptr()`` values in an int64 table that the kernel casts
with ``.to(tl.pointer_type(...))``; this works on CUDA and under ``TRITON_INTERPRET=1`` (where
pointers are raw host addresses). ``data_ptr()`` does not exist on the fake/functional tensors of
a trace, so this kernel only runs on real tensors (the eager calls, and the opaque ``*_fused``
ops); traced calls take ``triton_traced.py``'s kernels, which receive every tensor as an argument.

Rounding: fp32 -> bf16 is rounded to nearest-even by bit arithmetic in the kernel, since the
interpreter's native cast truncates; the result then equals ``Tensor.to(torch.bfloat16)`` on every
backend. fp64 sources are rounded through fp32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fsdp_compile.kernels._offsets import prefix_offsets, rank_major_segments

BLOCK = 2048

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
# The source dtype of a segment, as ``_segment_copy_kernel`` branches on it.
_SOURCE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


@triton.jit
def _cast(x, DST: tl.constexpr):
    if DST == tl.bfloat16:
        if x.dtype == tl.bfloat16:
            y = x
        else:
            xf = x.to(tl.float32)
            bits = xf.to(tl.uint32, bitcast=True)
            r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            r = tl.where(xf != xf, 0x7FC0, r)
            y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DST)
    return y


@triton.jit
def _find_segment(prefix_ptr, num_segments, pid, SEARCH_STEPS: tl.constexpr):
    """The segment ``s`` with ``prefix[s] <= pid < prefix[s+1]`` (binary search)."""
    lo = pid * 0
    hi = lo + num_segments
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(prefix_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _copy_block(src, dst, offs, copy_len, total_len):
    """``dst[offs] = cast(src[offs])`` where ``offs < copy_len``; zeros where
    ``copy_len <= offs < total_len`` (the padding)."""
    x = tl.load(src + offs, mask=offs < copy_len, other=0.0)
    tl.store(dst + offs, _cast(x, dst.dtype.element_ty), mask=offs < total_len)


@triton.jit
def _segment_copy_kernel(
    table_ptr,
    num_segments,
    DST: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """table rows: [0] src addr, [1] src dtype (``_SOURCE_CODES``), [2] dst addr, [3] copy_len,
    [4] total_len, [5] block prefix (``num_segments + 1`` entries). Program ``pid`` serves
    segment ``s`` with ``prefix[s] <= pid < prefix[s+1]``; the source's dtype is a per-segment
    branch (uniform within a program), so a list of mixed dtypes is still one launch."""
    pid = tl.program_id(0).to(tl.int64)
    stride = num_segments + 1
    prefix = table_ptr + 5 * stride
    seg = _find_segment(prefix, num_segments, pid, SEARCH_STEPS)
    address = tl.load(table_ptr + seg)
    code = tl.load(table_ptr + stride + seg)
    dst = tl.load(table_ptr + 2 * stride + seg).to(tl.pointer_type(DST))
    copy_len = tl.load(table_ptr + 3 * stride + seg)
    total_len = tl.load(table_ptr + 4 * stride + seg)
    offs = (pid - tl.load(prefix + seg)) * BLOCK + tl.arange(0, BLOCK)
    if code == 0:
        _copy_block(address.to(tl.pointer_type(tl.float32)), dst, offs, copy_len, total_len)
    elif code == 1:
        _copy_block(address.to(tl.pointer_type(tl.bfloat16)), dst, offs, copy_len, total_len)
    elif code == 2:
        _copy_block(address.to(tl.pointer_type(tl.float16)), dst, offs, copy_len, total_len)
    else:
        _copy_block(address.to(tl.pointer_type(tl.float64)), dst, offs, copy_len, total_len)


def _segment_table(segments, device) -> tuple[torch.Tensor, int, int]:
    """``(table, segments, programs)``: one int64 row per segment field (the last field is
    ``total_len``), then the block prefix, ``len(segments) + 1`` entries each. Read by
    ``_segment_copy_kernel`` and by ``triton_traced``'s kernels."""
    blocks = [-(-s[-1] // BLOCK) for s in segments]
    prefix = prefix_offsets(blocks)
    rows = [list(col) + [0] for col in zip(*segments)] + [list(prefix)]
    return torch.tensor(rows, dtype=torch.int64, device=device), len(segments), prefix[-1]


def _launch(segments: list[tuple[int, int, int, int, int]], dst_dtype, device):
    """Copy ``(src_addr, src_code, dst_addr, copy_len, total_len)`` segments in one launch."""
    segments = [s for s in segments if s[-1] > 0]
    if not segments:
        return
    table, n, programs = _segment_table(segments, device)
    _segment_copy_kernel[(programs,)](
        table,
        n,
        DST=_TL_DTYPES[dst_dtype],
        SEARCH_STEPS=max(1, n.bit_length()),
        BLOCK=BLOCK,
    )


def _source(t: Tensor, element_offset: int = 0) -> tuple[int, int]:
    """``(address, dtype code)`` of ``t``'s element ``element_offset``."""
    return t.data_ptr() + element_offset * t.element_size(), _SOURCE_CODES[t.dtype]


def all_gather_copy_in(shards: Sequence[Tensor], padded_numels: Sequence[int], dtype: torch.dtype) -> Tensor:
    offs = prefix_offsets(padded_numels)
    out = torch.empty(offs[-1], dtype=dtype, device=shards[0].device)
    shards = [s if s.is_contiguous() else s.contiguous() for s in shards]
    base, esz = out.data_ptr(), out.element_size()
    _launch([_source(s) + (base + off * esz, s.numel(), p) for s, off, p in zip(shards, offs, padded_numels)], dtype, out.device)
    return out


def all_gather_copy_out(
    gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int, out: Sequence[Tensor]
) -> None:
    gathered = gathered.contiguous()
    esz = gathered.element_size()
    segs = [
        _source(gathered, s.slot_start) + (out[s.param].data_ptr() + s.full_start * esz, s.numel, s.numel)
        for s in rank_major_segments(tuple(tuple(x) for x in full_shapes), world_size)
    ]
    _launch(segs, gathered.dtype, gathered.device)


def reduce_scatter_copy_in(grads: Sequence[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    layout = rank_major_segments(tuple(tuple(g.shape) for g in grads), world_size)
    total = sum(s.padded for s in layout)
    out = torch.empty(total, dtype=dtype, device=grads[0].device)
    base, esz = out.data_ptr(), out.element_size()
    segs = [_source(grads[s.param], s.full_start) + (base + s.slot_start * esz, s.numel, s.padded) for s in layout]
    _launch(segs, dtype, out.device)
    return out
