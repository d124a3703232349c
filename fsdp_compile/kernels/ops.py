"""``fsdp_compile::`` copy-in/copy-out ops, with fake, autograd and traced implementations.

Owns: op schemas, the autograd formulas, the eager CPU/Triton dispatch and the single switch
:func:`use_triton`. Shapes and offsets come only from the arguments (``padded_numels``,
``full_shapes``, ``world_size``), never from data, so the ops trace under FakeTensorMode /
torch.compile.

The four functional ops are ``torch.library.triton_op``s: one Python body that is the eager
kernel, the fake kernel and, under AOTAutograd, the decomposition the backend sees. The body
branches once, on whether its tensors are real:

- real tensors (eager): ``_impl`` picks ``cpu.py`` or the one-launch address-table Triton kernel;
- traced tensors (fake / functional): ``traced.py`` returns a ``wrap_triton`` launch, plain ATen,
  or the opaque ``*_fused`` op below (the CPU default), by device.

The public wrappers call the eager kernel directly, past the dispatcher, when nothing needs the
op (``_direct``: no compile, trace or mode active, real tensors, no grad to record); otherwise
they call the op.

Eager dispatch (``_want_triton``), in order:
1. ``FSDP_COMPILE_FORCE_TRITON=1`` in the environment, or ``use_triton(True)``: Triton for every
   call (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before Triton is imported).
2. ``use_triton(False)``: the torch path everywhere.
3. default: Triton for CUDA tensors whose bucket has at least ``TRITON_MIN_NUMEL`` elements; the
   torch path (``cpu.py``, device generic) for CPU tensors and for tiny buckets, where launching a
   kernel and uploading its pointer table costs more than a few plain copies.

Autograd: copy-in and copy-out are each other's transpose. d(all_gather_copy_out)/d(gathered) is
``reduce_scatter_copy_in`` of the output grads (padding positions get zero); d(reduce_scatter_copy_in)
is ``all_gather_copy_out`` of the incoming grad; d(all_gather_copy_in)/d(shard_i) is the slice
``[off_i, off_i + numel_i)`` of the slot grad. Mutating variants have no autograd.
"""

from __future__ import annotations

import functools
import operator
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from fsdp_compile.kernels import cpu, traced
from fsdp_compile.kernels._offsets import (
    pack_shapes,
    padded_numels as _padded_numels,
    prefix_offsets,
    unpack_shapes,
)

TRITON_MIN_NUMEL = 1 << 16
_triton_override: Optional[bool] = None


def use_triton(enabled: Optional[bool] = None) -> Optional[bool]:
    """Set the process-wide Triton switch (``True``/``False``/``None`` = automatic); returns the
    previous value. This is the only global state of ``fsdp_compile.kernels``."""
    global _triton_override
    previous, _triton_override = _triton_override, enabled
    return previous


def _want_triton(device: torch.device, numel: int) -> bool:
    if os.environ.get("FSDP_COMPILE_FORCE_TRITON") == "1" or _triton_override is True:
        return True
    if _triton_override is False:
        return False
    return device.type == "cuda" and numel >= TRITON_MIN_NUMEL


def _impl(device: torch.device, numel: int):
    if _want_triton(device, numel):
        from fsdp_compile.kernels import triton_kernels

        return triton_kernels
    return cpu


def _traced(t: Tensor) -> bool:
    """True for the fake / functional tensors of a trace (no data, no ``data_ptr``)."""
    return is_fake(t)


# all_gather_copy_in ----------------------------------------------------------------------------


def _all_gather_copy_in_real(shards: list[Tensor], padded_numels: list[int], dtype: torch.dtype) -> Tensor:
    return _impl(shards[0].device, sum(padded_numels)).all_gather_copy_in(shards, padded_numels, dtype)


@triton_op("fsdp_compile::all_gather_copy_in", mutates_args=())
def _all_gather_copy_in(shards: list[Tensor], padded_numels: list[int], dtype: torch.dtype) -> Tensor:
    if _traced(shards[0]):
        return traced.all_gather_copy_in(shards, padded_numels, dtype)
    return _all_gather_copy_in_real(shards, padded_numels, dtype)


_all_gather_copy_in_fused = torch.library.custom_op("fsdp_compile::all_gather_copy_in_fused", mutates_args=())(
    _all_gather_copy_in_real
)


@_all_gather_copy_in_fused.register_fake
def _(shards, padded_numels, dtype):
    return shards[0].new_empty(sum(padded_numels), dtype=dtype)


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


# all_gather_copy_out ---------------------------------------------------------------------------


def _all_gather_copy_out_real(gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int) -> list[Tensor]:
    impl = _impl(gathered.device, gathered.numel())
    if impl is cpu:
        return cpu.all_gather_copy_out_new(gathered.reshape(-1), flat_shapes, ndims, world_size)
    shapes = unpack_shapes(flat_shapes, ndims)
    out = [torch.empty(s, dtype=gathered.dtype, device=gathered.device) for s in shapes]
    impl.all_gather_copy_out(gathered.reshape(-1), shapes, world_size, out)
    return out


@triton_op("fsdp_compile::all_gather_copy_out", mutates_args=())
def _all_gather_copy_out(gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int) -> list[Tensor]:
    if _traced(gathered):
        return traced.all_gather_copy_out(gathered, unpack_shapes(flat_shapes, ndims), world_size)
    return _all_gather_copy_out_real(gathered, flat_shapes, ndims, world_size)


_all_gather_copy_out_fused = torch.library.custom_op("fsdp_compile::all_gather_copy_out_fused", mutates_args=())(
    _all_gather_copy_out_real
)


@_all_gather_copy_out_fused.register_fake
def _(gathered, flat_shapes, ndims, world_size):
    return [gathered.new_empty(s) for s in unpack_shapes(flat_shapes, ndims)]


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


@torch.library.custom_op("fsdp_compile::all_gather_copy_out_", mutates_args=("out",))
def _all_gather_copy_out_(
    gathered: Tensor, flat_shapes: list[int], ndims: list[int], world_size: int, out: list[Tensor]
) -> None:
    shapes = unpack_shapes(flat_shapes, ndims)
    impl = _impl(gathered.device, gathered.numel())
    if impl is not cpu and not all(o.is_contiguous() for o in out):
        impl = cpu
    impl.all_gather_copy_out(gathered.reshape(-1), shapes, world_size, out)


@_all_gather_copy_out_.register_fake
def _(gathered, flat_shapes, ndims, world_size, out):
    return None


# reduce_scatter_copy_in ------------------------------------------------------------------------


def _reduce_scatter_copy_in_real(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    numel = sum(g.numel() for g in grads)
    return _impl(grads[0].device, numel).reduce_scatter_copy_in(grads, world_size, dtype)


@triton_op("fsdp_compile::reduce_scatter_copy_in", mutates_args=())
def _reduce_scatter_copy_in(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    if _traced(grads[0]):
        return traced.reduce_scatter_copy_in(grads, world_size, dtype)
    return _reduce_scatter_copy_in_real(grads, world_size, dtype)


_reduce_scatter_copy_in_fused = torch.library.custom_op(
    "fsdp_compile::reduce_scatter_copy_in_fused", mutates_args=()
)(_reduce_scatter_copy_in_real)


@_reduce_scatter_copy_in_fused.register_fake
def _(grads, world_size, dtype):
    total = sum(_padded_numels([g.shape for g in grads], world_size))
    return grads[0].new_empty(world_size * total, dtype=dtype)


def _rsci_setup(ctx, inputs, output):
    grads, world_size, _ = inputs
    ctx.flat_shapes, ctx.ndims = pack_shapes([g.shape for g in grads])
    ctx.dtypes = [g.dtype for g in grads]
    ctx.world_size = world_size


def _rsci_backward(ctx, grad):
    full = torch.ops.fsdp_compile.all_gather_copy_out(grad, ctx.flat_shapes, ctx.ndims, ctx.world_size)
    return [f.to(dt) for f, dt in zip(full, ctx.dtypes)], None, None


_reduce_scatter_copy_in.register_autograd(_rsci_backward, setup_context=_rsci_setup)


# reduce_scatter_copy_out -----------------------------------------------------------------------


@torch.library.custom_op("fsdp_compile::reduce_scatter_copy_out", mutates_args=("flat_grad",))
def _reduce_scatter_copy_out(slot: Tensor, flat_grad: Tensor, accumulate: bool) -> None:
    impl = _impl(slot.device, slot.numel())
    if impl is not cpu and not flat_grad.is_contiguous():
        impl = cpu
    impl.reduce_scatter_copy_out(slot, flat_grad, accumulate)


@_reduce_scatter_copy_out.register_fake
def _(slot, flat_grad, accumulate):
    return None


def _reduce_scatter_copy_out_new_real(slot: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(slot.shape, dtype=dtype, device=slot.device)
    _impl(slot.device, slot.numel()).reduce_scatter_copy_out(slot, out, False)
    return out


@triton_op("fsdp_compile::reduce_scatter_copy_out_new", mutates_args=())
def _reduce_scatter_copy_out_new(slot: Tensor, dtype: torch.dtype) -> Tensor:
    if _traced(slot):
        return traced.reduce_scatter_copy_out_new(slot, dtype)
    return _reduce_scatter_copy_out_new_real(slot, dtype)


_reduce_scatter_copy_out_new_fused = torch.library.custom_op(
    "fsdp_compile::reduce_scatter_copy_out_new_fused", mutates_args=()
)(_reduce_scatter_copy_out_new_real)


@_reduce_scatter_copy_out_new_fused.register_fake
def _(slot, dtype):
    return slot.new_empty(slot.shape, dtype=dtype)


def _rscon_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype


_reduce_scatter_copy_out_new.register_autograd(
    lambda ctx, grad: (grad.to(ctx.dtype), None), setup_context=_rscon_setup
)


# Python wrappers (public) ----------------------------------------------------------------------


_requires_grad = operator.attrgetter("requires_grad")


def _direct(tensors: Sequence[Tensor], autograd_checked_later: bool = False) -> bool:
    """True when a call can skip the dispatcher and run the eager kernel itself: no compile or
    trace in progress, no dispatch or torch-function mode, real tensors, nothing for autograd to
    record (unless the caller's kernel checks that itself: ``autograd_checked_later``, the C++
    copy-ins, which check while reading the list). Custom-op dispatch of a 1000-tensor list costs
    about 1 ms, as much as copying 64 MiB; a Python ``requires_grad`` loop over it, 0.06 ms."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not _traced(tensors[0])
        and (autograd_checked_later or not (torch.is_grad_enabled() and any(map(_requires_grad, tensors))))
    )


def _uses_cpp(device: torch.device) -> bool:
    """True when eager calls on ``device`` run the C++ extension, which validates the layout
    itself (``ValueError``), so a direct call needs no Python checks first."""
    return device.type == "cpu" and not _want_triton(device, 0) and cpu._ext(device) is not None


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
    if _direct(shards, autograd_checked_later=True) and _uses_cpp(shards[0].device):
        out = cpu.all_gather_copy_in(shards, padded_numels, dtype, defer_if_grad=True)
        if out is not None:
            return out
    direct = _direct(shards)
    padded_numels = list(map(int, padded_numels))
    if any(map(operator.gt, map(Tensor.numel, shards), padded_numels)):  # map: no per-tensor bytecode
        i = next(i for i, (s, p) in enumerate(zip(shards, padded_numels)) if s.numel() > p)
        raise ValueError(f"all_gather_copy_in: shard {i} has {shards[i].numel()} elements > padded numel {padded_numels[i]}")
    if direct:
        return _all_gather_copy_in_real(shards, padded_numels, dtype)
    return torch.ops.fsdp_compile.all_gather_copy_in(list(shards), padded_numels, dtype)


def all_gather_copy_out(
    gathered: Tensor, full_shapes: list[list[int]], world_size: int, out: Optional[list[Tensor]] = None
) -> list[Tensor]:
    """Unpack the rank-major all-gather buffer into one full tensor per param (padding dropped)."""
    layout = _copy_out_layout.__wrapped__ if torch.compiler.is_compiling() else _copy_out_layout  # Dynamo: no caches
    flat, ndims, want = layout(tuple(map(tuple, full_shapes)), world_size)
    if gathered.numel() != want:
        raise ValueError(
            f"all_gather_copy_out: gathered has {gathered.numel()} elements, layout of {len(full_shapes)} "
            f"params at world size {world_size} needs {want}"
        )
    if out is None:
        if _direct([gathered]):
            return _all_gather_copy_out_real(gathered, flat, ndims, world_size)
        return list(torch.ops.fsdp_compile.all_gather_copy_out(gathered, flat, ndims, world_size))
    if _direct([gathered, *out]) and _uses_cpp(gathered.device) and all(map(Tensor.is_contiguous, out)):
        cpu.all_gather_copy_out(gathered, full_shapes, world_size, out, packed=(flat, ndims))  # C++ checks each out
        return list(out)
    for i, (o, s) in enumerate(zip(out, full_shapes)):
        if tuple(o.shape) != tuple(s) or o.dtype != gathered.dtype:
            raise ValueError(
                f"all_gather_copy_out: out[{i}] is {tuple(o.shape)} {o.dtype}, expected {tuple(s)} {gathered.dtype}"
            )
    torch.ops.fsdp_compile.all_gather_copy_out_(gathered, flat, ndims, world_size, list(out))
    return list(out)


def reduce_scatter_copy_in(grads: list[Tensor], world_size: int, dtype: torch.dtype) -> Tensor:
    """Pack full gradients rank-major (``torch._chunk_cat`` layout, zero padded), cast to ``dtype``."""
    if not grads:
        raise ValueError("reduce_scatter_copy_in: pass at least one gradient")
    if min(map(Tensor.dim, grads)) == 0:
        _check_shapes([g.shape for g in grads])
    if _direct(grads, autograd_checked_later=True) and _uses_cpp(grads[0].device):
        out = cpu.reduce_scatter_copy_in(grads, world_size, dtype, defer_if_grad=True)
        if out is not None:
            return out
    if _direct(grads):
        return _reduce_scatter_copy_in_real(grads, world_size, dtype)
    return torch.ops.fsdp_compile.reduce_scatter_copy_in(list(grads), world_size, dtype)


def reduce_scatter_copy_out(slot: Tensor, flat_grad: Tensor, accumulate: bool) -> None:
    """``flat_grad = slot`` or ``flat_grad += slot``, cast to and added in ``flat_grad.dtype``."""
    if slot.shape != flat_grad.shape:
        raise ValueError(f"reduce_scatter_copy_out: slot {tuple(slot.shape)} vs flat_grad {tuple(flat_grad.shape)}")
    torch.ops.fsdp_compile.reduce_scatter_copy_out(slot, flat_grad, accumulate)


def reduce_scatter_copy_out_new(slot: Tensor, dtype: torch.dtype) -> Tensor:
    """Functional copy-out: a new tensor holding ``slot`` cast to ``dtype``."""
    return torch.ops.fsdp_compile.reduce_scatter_copy_out_new(slot, dtype)
