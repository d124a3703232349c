"""Traceable Triton copies: every copy op is one ``wrap_triton`` launch, for any number of sources.

Owns: the kernel family ``many_source_copy_<group sizes>`` (written out once per source count
and dtype grouping) and
the three launchers ``traced.py`` uses for the ``"triton"`` lowering (CUDA's default). Eager calls
never come here: ``triton_kernels.py`` copies real tensors through a table of addresses.

Why a family: a traced (fake / functional) tensor has no ``data_ptr()``, so a list of them cannot
go into an address table; to reach a list in one launch, each source must be a kernel argument of
its own, and a ``@triton.jit`` function has a fixed argument list. ``many_source_kernel((3,))`` is::

    @triton.jit
    def many_source_copy_3(src0, src1, src2, dst_ptr, table_ptr, num_segments, SEARCH_STEPS, BLOCK):
        seg = <this program's segment: binary search of the block prefix, row 5>
        which, src_off, dst_off, copy_len, total_len = <rows 0-4 at seg>
        from_0 = src0
        from_0 = tl.where(which == 1, src1, from_0)
        from_0 = tl.where(which == 2, src2, from_0)
        _copy_block(from_0 + src_off, dst_ptr + dst_off, offs, copy_len, total_len)

``which`` is one scalar per program, so choosing the source is ``K - 1`` scalar selects and the
copy itself is written once. (A branch per source instead makes compile time grow steeply with
the source count; benchmarks/README.md has the numbers.) A select
needs one pointer type, so sources are passed grouped by dtype and each group gets its own select
chain and copy body behind ``if which < <end of group>``: a mixed-dtype list is still one launch
(``many_source_kernel((3, 2))`` for three fp32 and two bf16 sources).

Table rows (``num_segments + 1`` int64 entries each): [0] source index, [1] source element offset,
[2] destination element offset, [3] copy_len, [4] total_len (positions ``[copy_len, total_len)``
get zeros: the padding), [5] block prefix. The table is a constant of the traced graph (it
depends on shapes only); the launch is a ``triton_kernel_wrapper_functional`` node that Inductor
compiles with the rest of the graph, and Triton's TTIR shows it reads the sources and the table and
writes only ``dst_ptr``, so Inductor clones nothing.

A launch takes at most ``MAX_SOURCES`` sources: 256 pointers are 2 KiB of kernel arguments, inside
the 4 KiB CUDA allows before 12.1. A longer list (a unit with more parameters) takes
``ceil(n / 256)`` launches into the same buffer, each writing its own segments.
"""

from __future__ import annotations

import functools
import itertools
import linecache
import math
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fsdp_compile.kernels import triton_kernels
from fsdp_compile.kernels._offsets import prefix_offsets, rank_major_segments

MAX_SOURCES = 256


def _select_and_copy(group: int, first: int, count: int, indent: str) -> list[str]:
    """Source lines: ``from_{group}`` = the ``which``-th of ``src{first}`` .. ``src{first+count-1}``
    (one dtype), then the copy. (One name per group: Triton types a name across if/else.)"""
    name = f"from_{group}"
    return (
        [f"{indent}{name} = src{first}"]
        + [f"{indent}{name} = tl.where(which == {i}, src{i}, {name})" for i in range(first + 1, first + count)]
        + [f"{indent}_copy_block({name} + src_off, dst, offs, copy_len, total_len)"]
    )


@functools.lru_cache(maxsize=None)
def many_source_kernel(group_sizes: tuple[int, ...]):
    """The ``@triton.jit`` kernel copying table segments from ``sum(group_sizes)`` sources, given
    as consecutive groups of one dtype each (one copy body per group)."""
    num_sources = sum(group_sizes)
    if not group_sizes or min(group_sizes) < 1 or num_sources > MAX_SOURCES:
        raise ValueError(f"fsdp_compile.kernels: a launch takes 1..{MAX_SOURCES} sources, got groups {group_sizes}")
    name = "many_source_copy_" + "_".join(map(str, group_sizes))
    sources = ", ".join(f"src{i}" for i in range(num_sources))
    lines = [
        "@triton.jit",
        f"def {name}({sources}, dst_ptr, table_ptr, num_segments, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):",
        "    pid = tl.program_id(0).to(tl.int64)",
        "    stride = num_segments + 1",
        "    seg = _find_segment(table_ptr + 5 * stride, num_segments, pid, SEARCH_STEPS)",
        "    which = tl.load(table_ptr + seg)",
        "    src_off = tl.load(table_ptr + stride + seg)",
        "    dst = dst_ptr + tl.load(table_ptr + 2 * stride + seg)",
        "    copy_len = tl.load(table_ptr + 3 * stride + seg)",
        "    total_len = tl.load(table_ptr + 4 * stride + seg)",
        "    offs = (pid - tl.load(table_ptr + 5 * stride + seg)) * BLOCK + tl.arange(0, BLOCK)",
    ]
    if len(group_sizes) == 1:
        lines += _select_and_copy(0, 0, num_sources, "    ")
    else:
        first = 0
        for g, count in enumerate(group_sizes):
            test = "else:" if g == len(group_sizes) - 1 else f"{'if' if g == 0 else 'elif'} which < {first + count}:"
            lines += [f"    {test}"] + _select_and_copy(g, first, count, "        ")
            first += count
    text = "\n".join(lines) + "\n"
    # Triton reads a kernel's source back (inspect.getsource) to compile and to cache it, so the
    # generated text is registered with linecache under a file name of its own.
    filename = f"<fsdp_compile.kernels.triton_traced:{name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    scope = {
        "__name__": __name__,
        "triton": triton,
        "tl": tl,
        "_find_segment": triton_kernels._find_segment,
        "_copy_block": triton_kernels._copy_block,
    }
    exec(compile(text, filename, "exec"), scope)
    return scope[name]


def copy_segments(srcs: Sequence[Tensor], dst: Tensor, segments: Sequence[tuple[int, int, int, int, int]]) -> None:
    """``dst[d:d+total] = cast(srcs[i][s:s+copy])``, zero-padded to ``total``, for every
    ``(i, s, d, copy, total)`` (element offsets into the flat contiguous ``srcs[i]`` and ``dst``):
    one ``wrap_triton`` launch per ``MAX_SOURCES`` sources, traceable."""
    from torch.library import wrap_triton

    order = sorted(range(len(srcs)), key=lambda i: str(srcs[i].dtype))  # stable: dtype groups
    for first in range(0, len(order), MAX_SOURCES):
        chunk = order[first : first + MAX_SOURCES]
        position = {i: k for k, i in enumerate(chunk)}
        segs = [(position[s[0]],) + tuple(s[1:]) for s in segments if s[-1] > 0 and s[0] in position]
        if not segs:
            continue
        group_sizes = tuple(len(list(run)) for _, run in itertools.groupby(srcs[i].dtype for i in chunk))
        table, n, programs = triton_kernels._segment_table(segs, dst.device)
        wrap_triton(many_source_kernel(group_sizes))[(programs,)](
            *(srcs[i] for i in chunk), dst, table, n, SEARCH_STEPS=max(1, n.bit_length()), BLOCK=triton_kernels.BLOCK
        )


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def all_gather_copy_in(shards: Sequence[Tensor], padded: Sequence[int], dtype: torch.dtype) -> Tensor:
    """This rank's slot: every shard cast to ``dtype`` at its offset, padding zero-filled."""
    offs = prefix_offsets(padded)
    out = torch.empty(offs[-1], dtype=dtype, device=shards[0].device)
    segs = [(i, 0, offs[i], s.numel(), p) for i, (s, p) in enumerate(zip(shards, padded))]
    copy_segments([_flat(s) for s in shards], out, segs)
    return out


def all_gather_copy_out_flat(gathered: Tensor, full_shapes: Sequence[Sequence[int]], world_size: int) -> Tensor:
    """The rank-major ``W*T`` buffer -> every full param back to back (param-major, no padding)."""
    shapes = tuple(tuple(int(d) for d in s) for s in full_shapes)
    starts = prefix_offsets([math.prod(s) for s in shapes])
    out = gathered.new_empty(starts[-1])
    segs = [(0, s.slot_start, starts[s.param] + s.full_start, s.numel, s.numel) for s in rank_major_segments(shapes, world_size)]
    copy_segments([_flat(gathered)], out, segs)
    return out


def reduce_scatter_copy_in(grads: Sequence[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    """Full gradients -> the rank-major buffer (``torch._chunk_cat`` layout), cast to ``dtype``."""
    layout = rank_major_segments(tuple(tuple(int(d) for d in g.shape) for g in grads), world_size)
    out = torch.empty(sum(s.padded for s in layout), dtype=dtype, device=grads[0].device)
    segs = [(s.param, s.full_start, s.slot_start, s.numel, s.padded) for s in layout]
    copy_segments([_flat(g) for g in grads], out, segs)
    return out
