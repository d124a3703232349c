"""Reusable CPU output buffers for the copy-in ops that return a new flat buffer.

Why: a fresh CPU allocation above glibc's mmap threshold (32 MiB) is page-faulted in on first
touch; here that runs at ~8 GB/s, a third of copy bandwidth, and it happens on every call since
the memory goes back to the OS when freed. Reusing the same pages makes the copy-in a plain copy.

Invariant: a buffer is handed out only while nothing else refers to its storage. The pool keeps a
private base tensor and hands out fresh (non-view) tensors sharing its storage; the storage's use
count counts every tensor on it (handed-out tensors, views, autograd's saved copies, a collective's
in-flight Work, Inductor's locals), so ``use count == 2`` (the base plus the probe's own handle)
means free. Only CPU buffers of at least ``MIN_BYTES``, at most ``PER_KEY`` per (numel, dtype).

Cost: the pooled buffers stay allocated. With one per size that is one all-gather slot and one
reduce-scatter input per distinct unit size (units of equal size share them): steady state needs
no more, since a unit's copy-in buffer is free again once its collective has completed.
``enable(False)`` trades the bandwidth back for that memory.
"""
from __future__ import annotations

import torch

MIN_BYTES = 1 << 20
PER_KEY = 1
_pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
_enabled = True


def enable(flag: bool) -> bool:
    """Turn reuse on or off (off frees every pooled buffer); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    if not _enabled:
        _pool.clear()
    return previous


def _is_free(base: torch.Tensor) -> bool:
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) == 2


def _alias(base: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=base.dtype).set_(base.untyped_storage(), 0, base.shape, (1,))


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(numel)``, from the pool when the size makes it worth it."""
    itemsize = dtype.itemsize
    if not _enabled or device.type != "cpu" or numel * itemsize < MIN_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    bases = _pool.setdefault((numel, dtype), [])
    for base in bases:
        if _is_free(base):
            return _alias(base)
    fresh = torch.empty(numel, dtype=dtype, device=device)
    if len(bases) < PER_KEY:
        bases.append(fresh)
        return _alias(fresh)
    return fresh
