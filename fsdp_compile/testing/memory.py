"""Memory of a training step: what a step adds at its peak, and what a process holds between steps.

``profile_step``: ``torch.profiler.profile(profile_memory=True)`` records a ``[memory]`` event
(+bytes / -bytes) for every CPU allocation and free made through c10's allocator. Sorted by time,
their running sum is what the call allocated and still holds; its maximum is the call's peak
growth. Memory that existed before the call (parameters, optimizer state, kept buffers) is not in
it: add :func:`bytes_in_use` taken just before the step for the total high-water mark. The
profiler reports a free only on a thread that runs under it: a tensor whose last reference a
collective's worker thread (gloo's) drops is freed unreported. An allocation at an address the
running sum still holds proves that free happened, so it is counted there, before the new block.

``bytes_in_use``: glibc's ``mallinfo2()``: bytes of every live ``malloc`` block (arena and
mmapped), whoever allocated them (c10's CPU allocator, Python, gloo, Inductor's runtime).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections import Counter
from typing import Any, Callable, Optional

from fsdp_compile import torch_private


def profile_step(
    fn: Callable[[], Any],
    count_prefixes: tuple[str, ...] = (),
    on_profile: Optional[Callable[[Any], None]] = None,
) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` under the profiler -> (peak growth in bytes, counts of the profiler events
    whose names start with one of ``count_prefixes``). ``on_profile(prof)`` may read the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = torch_private.profiled_events(prof)
    running = peak = 0
    held: dict[int, int] = {}  # address -> bytes of the blocks allocated during the call, not freed
    for _, ptr, nbytes, _ in torch_private.profiled_cpu_allocations(prof):
        if nbytes > 0:
            running += nbytes - held.pop(ptr, 0)  # a live address again: its free went unreported
            held[ptr] = nbytes
        else:
            running += nbytes
            held.pop(ptr, None)
        peak = max(peak, running)
    names = Counter(e.name() for e in events if count_prefixes and e.name().startswith(count_prefixes))
    if on_profile is not None:
        on_profile(prof)
    return peak, dict(names)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


@functools.cache
def _mallinfo2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    fn = getattr(libc, "mallinfo2", None)
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def bytes_in_use() -> Optional[int]:
    """Bytes of live ``malloc`` blocks in this process (glibc ``mallinfo2``: arena + mmapped),
    or ``None`` where the C library has no ``mallinfo2`` (not glibc >= 2.33)."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)
