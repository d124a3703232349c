"""``fsdp_compile::`` copy-in/copy-out ops, with fake, autograd and traced implementations.

Owns: the three op schemas (and their opaque ``*_fused`` twins, which run the same eager body),
their autograd formulas, and the choice of eager kernel. Shapes and offsets come only from the
arguments (``padded_numels``, ``full_shapes``, ``world_size``), never from data, so the ops trace
under FakeTensorMode / torch.compile.

Each op is a ``torch.library.triton_op``: one Python body that is the eager kernel, the fake
kernel and, under AOTAutograd, the decomposition the backend sees. The body branches once, on
whether its tensors are real:

- real tensors (eager): the address-table Triton kernel (``triton_kernels.py``, one launch) for
  CUDA buckets of at least ``TRITON_MIN_NUMEL`` elements; torch's own ops (``cpu.py``:
  ``torch._chunk_cat``, ``torch.cat``, ``torch.split_with_sizes_copy``) for CPU tensors and tiny
  buckets, where a launch and its pointer table cost more than a few plain copies;
- traced tensors (fake / functional): ``traced.py``, a ``wrap_triton`` launch on CUDA, one of
  the opaque ``*_fused`` ops below on CPU (their body is the eager torch-op copy), or plain ATen
  (Inductor generates the copies), as the backend's ``copies=`` option chose.

Autograd: copy-in and copy-out are each other's transpose. d(all_gather_copy_out)/d(gathered) is
``reduce_scatter_copy_in`` of the output grads (padding positions get zero); d(reduce_scatter_copy_in)
is ``all_gather_copy_out`` of the incoming grad; d(all_gather_copy_in)/d(shard_i) is the slice
``[off_i, off_i + numel_i)`` of the slot grad.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from fsdp_compile.kernels import cpu, traced
from fsdp_compile.kernels._offsets import pack_shapes, padded_numels as _padded_numels, prefix_offsets, unpack_shapes

TRITON_MIN_NUMEL = 1 << 16

# The opaque ``*_fused`` ops run only in compiled graphs, after AOTAutograd: they need no autograd
# formula, so they are plain library ops whose one CompositeExplicitAutograd kernel is the eager
# body. A ``custom_op`` would add its Python autograd and checking layers to every call
# (``benchmarks/copy_kernels.py --per-call`` measures both; benchmarks/README.md).
_LIB = torch.library.Library("fsdp_compile", "FRAGMENT")


def _opaque_op(name: str, schema: str, body, fake) -> None:
    """Define ``fsdp_compile::name(schema)``, run ``body`` on real tensors and ``fake`` when traced."""
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fsdp_compile::{name}", fake, lib=_LIB)


def eager_kernels(device: torch.device, numel: int):
    """The module whose functions copy real tensors on ``device`` for a bucket of ``numel``."""
    if device.type == "cuda" and numel >= TRITON_MIN_NUMEL:
        from fsdp_compile.kernels import triton_kernels

        return triton_kernels
    return cpu


# all_gather_copy_in ----------------------------------------------------------------------------


def _all_gather_copy_in_real(shards: list[Tensor], padded_numels: list[int], dtype: torch.dtype) -> Tensor:
    return eager_kernels(shards[0].device, sum(padded_numels)).all_gather_copy_in(shards, padded_numels, dtype)


@triton_op("fsdp_compile::all_gather_copy_in", mutates_args=())
def _all_gather_copy_in(shards: list[Tensor], padded_numels: list[int], dtype: torch.dtype) -> Tensor:
    if is_fake(shards[0]):
        return traced.all_gather_copy_in(shards, padded_numels, dtype)
    return _all_gather_copy_in_real(shards, padded_numels, dtype)


def _agci_setup(ctx, inputs, output):
    shards, padded_numels, _ = inputs
    ctx.meta = [(s.shape, s.dtype) for s in shards]
    ctx.offsets = prefix_offsets(padded_numels)


def _agci_backward(ctx, grad):
    grads = [
        grad[off : off + shape.numel()].view(shape).to(dtype)
        for (shape, dtype), off in zip(ctx.meta, ctx.offsets)
    ]
    return grads, None, None


_all_gather_copy_in.register_autograd(_agci_backward, setup_context=_agci_setup)


_opaque_op(
    "all_gather_copy_in_fused", "(Tensor[] shards, SymInt[] padded_numels, ScalarType dtype) -> Tensor",
    _all_gather_copy_in_real,
    lambda shards, padded_numels, dtype: shards[0].new_empty(sum(padded_numels), dtype=dtype),
)


# all_gather_copy_out ---------------------------------------------------------------------------


def _all_gather_copy_out_real(gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int) -> list[Tensor]:
    shapes = unpack_shapes(flat_shapes, ndims)
    out = [torch.empty(s, dtype=gathered.dtype, device=gathered.device) for s in shapes]
    eager_kernels(gathered.device, gathered.numel()).all_gather_copy_out(gathered.reshape(-1), shapes, world_size, out)
    return out


@triton_op("fsdp_compile::all_gather_copy_out", mutates_args=())
def _all_gather_copy_out(gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int) -> list[Tensor]:
    if is_fake(gathered):
        return traced.all_gather_copy_out(gathered, unpack_shapes(flat_shapes, ndims), world_size)
    return _all_gather_copy_out_real(gathered, flat_shapes, ndims, world_size)


_opaque_op(
    "all_gather_copy_out_fused",
    "(Tensor gathered, SymInt[] flat_shapes, SymInt[] ndims, SymInt world_size) -> Tensor[]",
    _all_gather_copy_out_real,
    lambda gathered, flat_shapes, ndims, world_size: [gathered.new_empty(s) for s in unpack_shapes(flat_shapes, ndims)],
)


def _agco_setup(ctx, inputs, output):
    gathered, flat_shapes, ndims, world_size = inputs
    ctx.shapes = unpack_shapes(flat_shapes, ndims)
    ctx.world_size = world_size
    ctx.gathered_shape = gathered.shape
    ctx.dtype = gathered.dtype
    ctx.device = gathered.device


def _agco_backward(ctx, grads):
    grads = [torch.zeros(s, dtype=ctx.dtype, device=ctx.device) if g is None else g for g, s in zip(grads, ctx.shapes)]
    flat = torch.ops.fsdp_compile.reduce_scatter_copy_in(grads, ctx.world_size, ctx.dtype)
    return flat.view(ctx.gathered_shape), None, None, None


_all_gather_copy_out.register_autograd(_agco_backward, setup_context=_agco_setup)


# reduce_scatter_copy_in ------------------------------------------------------------------------


def _reduce_scatter_copy_in_real(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    numel = sum(g.numel() for g in grads)
    return eager_kernels(grads[0].device, numel).reduce_scatter_copy_in(grads, world_size, dtype)


@triton_op("fsdp_compile::reduce_scatter_copy_in", mutates_args=())
def _reduce_scatter_copy_in(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    if is_fake(grads[0]):
        return traced.reduce_scatter_copy_in(grads, world_size, dtype)
    return _reduce_scatter_copy_in_real(grads, world_size, dtype)


def _rsci_setup(ctx, inputs, output):
    grads, world_size, _ = inputs
    ctx.flat_shapes, ctx.ndims = pack_shapes([g.shape for g in grads])
    ctx.dtypes = [g.dtype for g in grads]
    ctx.world_size = world_size


def _rsci_backward(ctx, grad):
    full = torch.ops.fsdp_compile.all_gather_copy_out(grad, ctx.flat_shapes, ctx.ndims, ctx.world_size)
    return [f.to(dt) for f, dt in zip(full, ctx.dtypes)], None, None


_reduce_scatter_copy_in.register_autograd(_rsci_backward, setup_context=_rsci_setup)


_opaque_op(
    "reduce_scatter_copy_in_fused", "(Tensor[] grads, SymInt world_size, ScalarType dtype) -> Tensor",
    _reduce_scatter_copy_in_real,
    lambda grads, world_size, dtype: grads[0].new_empty(
        world_size * sum(_padded_numels([g.shape for g in grads], world_size)), dtype=dtype
    ),
)


# Python wrappers (public): argument checks, then the op ----------------------------------------


@functools.lru_cache(maxsize=256)
def _copy_out_layout(full_shapes: tuple[tuple[int, ...], ...], world_size: int) -> tuple[list[int], list[int], int]:
    """``(flat dims, ndims, gathered numel)`` of a layout, once per layout."""
    _check_shapes(full_shapes)
    flat, ndims = pack_shapes(full_shapes)
    return flat, ndims, world_size * sum(_padded_numels(full_shapes, world_size))


def _check_shapes(full_shapes: Sequence[Sequence[int]]) -> None:
    for i, s in enumerate(full_shapes):
        if len(s) == 0:
            raise ValueError(f"fsdp_compile.kernels: param {i} is 0-D; shard 1-D or larger params only")


def all_gather_copy_in(shards: list[Tensor], padded_numels: list[int], dtype: torch.dtype) -> Tensor:
    """Pack this rank's shards (cast to ``dtype``) into its zero-padded slot of ``sum(padded_numels)``."""
    if not shards or len(shards) != len(padded_numels):
        raise ValueError(
            f"all_gather_copy_in: got {len(shards)} shards and {len(padded_numels)} padded numels; "
            "pass one padded numel per shard (and at least one shard)"
        )
    padded_numels = [int(p) for p in padded_numels]
    for i, (s, p) in enumerate(zip(shards, padded_numels)):
        if s.numel() > p:
            raise ValueError(f"all_gather_copy_in: shard {i} has {s.numel()} elements > padded numel {p}")
    return torch.ops.fsdp_compile.all_gather_copy_in(list(shards), padded_numels, dtype)


def all_gather_copy_out(gathered: Tensor, full_shapes: list[list[int]], world_size: int) -> list[Tensor]:
    """Unpack the rank-major all-gather buffer into one full tensor per param (padding dropped)."""
    layout = _copy_out_layout.__wrapped__ if torch.compiler.is_compiling() else _copy_out_layout  # Dynamo: no caches
    flat, ndims, want = layout(tuple(map(tuple, full_shapes)), world_size)
    if gathered.numel() != want:
        raise ValueError(
            f"all_gather_copy_out: gathered has {gathered.numel()} elements, layout of {len(full_shapes)} "
            f"params at world size {world_size} needs {want}"
        )
    return list(torch.ops.fsdp_compile.all_gather_copy_out(gathered, flat, ndims, world_size))


def reduce_scatter_copy_in(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    """Pack full gradients rank-major (``torch._chunk_cat`` layout, zero padded), cast to ``dtype``."""
    if not grads:
        raise ValueError("reduce_scatter_copy_in: pass at least one gradient")
    _check_shapes([g.shape for g in grads])
    return torch.ops.fsdp_compile.reduce_scatter_copy_in(list(grads), world_size, dtype)
