"""Peak memory growth of one call, measured by the CPU allocator's own profiler events.

``torch.profiler.profile(profile_memory=True)`` records a ``[memory]`` event (+bytes / -bytes)
for every CPU allocation and free made through c10's allocator. Sorted by time, their running
sum is what the call allocated and still holds; its maximum is the call's peak growth. Memory
that existed before the call (parameters, optimizer state) is not in it: add the steady bytes
for the total high-water mark.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable


def profile_step(fn: Callable[[], Any], count_prefixes: tuple[str, ...] = ()) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` under the profiler -> (peak growth in bytes, counts of the profiler events
    whose names start with one of ``count_prefixes``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    running = peak = 0
    for _, nbytes in memory:
        running += nbytes
        peak = max(peak, running)
    names = Counter(e.name() for e in events if count_prefixes and e.name().startswith(count_prefixes))
    return peak, dict(names)
