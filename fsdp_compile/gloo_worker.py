"""A one-worker-thread twin of each gloo process group our collectives run on.

Why: ``ProcessGroupGloo`` executes collectives on two worker threads by default (neither
``init_process_group`` nor ``new_group`` passes gloo options, so a caller cannot change it). In torch 2.13, when a worker
finishes a collective it assigns ``pgStatus_->lastCompletedWorkName`` after releasing its queue
lock (``ProcessGroupGloo::runLoop``). When both workers finish at once, the two ``std::string``
move-assignments race. A name longer than libstdc++'s 15-character inline buffer
(``"ALLGATHER_COALESCED"``, the op of every functional ``all_gather_into_tensor``) lives on the
heap, so one thread frees the buffer the other is still copying into. AddressSanitizer reports it
as a heap-use-after-free of a 20-byte string, freed by one ``runLoop`` thread and written by the
other. Without it the process dies later with ``malloc(): unaligned tcache chunk detected``.
FSDP has two collectives in flight whenever a prefetched all-gather runs beside a gradient
reduction, so a long run on gloo hits the race sooner or later (benchmarks/README.md, "The gloo
heap race").

Invariant: every collective fsdp_compile issues on a gloo group goes through that group's twin,
a ``ProcessGroupGloo`` over the same ranks, devices and timeout with exactly one worker thread.
Its collectives run and finish one at a time, in issue order (the same order on every rank). They
stay asynchronous to the main thread, which keeps computing while they run.

The twin is registered under its own group name, so functional collectives
(``torch.ops._c10d_functional``) resolve it by name, traced or eager. The user's group is
untouched; our state dicts and rank checks still use it.

Twins and the groups they serve are released before the interpreter finalizes (an ``atexit``
handler, registered with the first twin). A gloo worker thread drops a finished collective's
work, and with it the last reference to its tensors, after the caller's ``wait`` has returned;
when those tensors have Python objects, the worker takes the GIL to release them. If the process
group is still alive when ``Py_FinalizeEx`` starts, a worker that reaches that point then is
ended by the interpreter (``PyThread_exit_thread``) inside the work's ``noexcept`` destructor,
and the process aborts with ``terminate called without an active exception`` after all its work
is done. A group outlives ``destroy_process_group`` while anything holds it: the twin table here,
and a sharded model's state, which sits in reference cycles until the garbage collector runs.
Destroying a ``ProcessGroupGloo`` from Python releases the GIL and joins its workers, so
releasing the groups before finalization lets the workers finish their last releases.

The twin is a plain (C++) ``ProcessGroup``, never a Python subclass. Twins that overrode the
all-gather in Python deadlocked, in the eager backward and in a compiled step. gloo's worker,
releasing a finished work under its queue lock, had to release a tensor's Python object and
waited for the GIL. The main thread held the GIL and was waiting for that lock to queue the next
collective (ARCHITECTURE.md, lessons).
"""
from __future__ import annotations

import atexit
import functools
import gc
from typing import Optional

import torch
import torch.distributed as dist
from . import torch_private
from .failures import naming_collective_failures

# user group -> its twin
_twins: dict[dist.ProcessGroup, dist.ProcessGroup] = {}
# group name -> how many twins this process has made for a group of that name (re-initialized
# worlds reuse names; each twin needs fresh rendezvous keys in the store)
_made: dict[str, int] = {}

SUFFIX = "/fsdp_compile_one_worker"


def one_worker_group_name(group: dist.ProcessGroup) -> str:
    """The name of ``group``'s one-worker twin, made on first use.

    Collective over ``group``'s ranks the first time (the twin's sockets connect through the
    default store), like ``new_group``; every rank of ``group`` must call it in the same order.
    A barrier on ``group`` comes first: the twin's rendezvous waits in the store for every rank
    up to the process group's timeout, a dead rank included, while the barrier runs on
    ``group``'s open connections and fails at once when a peer's are closed.
    """
    _drop_destroyed()
    if group not in _twins:
        with naming_collective_failures("fully_shard's barrier before connecting our collectives' process group"):
            dist.barrier(group=group)
        _twins[group] = _make_twin(group)
    return _twins[group].group_name


def abandon_twin(group: Optional[dist.ProcessGroup]) -> None:
    """Close this rank's connections of ``group``'s twin (if it has one): the peers' pending and
    later collectives on it fail at once ("Connection closed by peer"). The twin is forgotten,
    so a later ``fully_shard`` connects a new one."""
    twin = _twins.pop(group, None) if group is not None else None
    if twin is not None:
        torch_private.cpu_backend(twin).abort()


def served_by_gloo(group, device: torch.device) -> bool:
    """Whether gloo is the backend of the user's ``group`` for ``device``."""
    if group is None:
        return False
    backend = str(dist.get_backend(group))
    by_device = dict(part.split(":", 1) for part in backend.split(",") if ":" in part)
    return by_device.get(device.type, backend) == "gloo"


def _make_twin(group: dist.ProcessGroup) -> dist.ProcessGroup:
    from torch.distributed import ProcessGroupGloo

    n = _made.get(group.group_name, 0)
    _made[group.group_name] = n + 1
    _release_at_exit()
    name = f"{group.group_name}{SUFFIX}/{n}"
    store = dist.PrefixStore(f"{name}/", torch_private.default_store())
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    options = torch_private.gloo_options(threads=1, like=_gloo_options(group))
    backend = ProcessGroupGloo(store, rank, size, options)
    return torch_private.process_group_over(store, rank, size, backend, name)


def _gloo_options(group: dist.ProcessGroup):
    """The user's gloo backend options (devices, timeout), or None when they cannot be read
    (a debug wrapper around the backend, for instance)."""
    try:
        return torch_private.cpu_backend(group).options
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _release_at_exit() -> None:
    """Register ``release_before_exit`` with ``atexit`` (once per process)."""
    atexit.register(release_before_exit)


def release_before_exit() -> None:
    """Let go of every twin, then collect garbage: the twins, and the user's groups that only
    unreachable sharded models still hold, are destroyed (their gloo workers joined) while the
    interpreter can still run the workers' last releases of Python-owned tensors. Groups the
    program itself still holds are left alone. Runs at exit; safe to call earlier once no
    sharded model will run again."""
    _twins.clear()
    gc.collect()


def _drop_destroyed() -> None:
    """Forget twins of groups ``destroy_process_group`` has destroyed (their worker exits)."""
    live = torch_private.live_process_groups()
    for group in [g for g in _twins if g not in live]:
        del _twins[group]


def worker_threads(group) -> Optional[int]:
    """How many worker threads run the collectives of ``group`` (a group or a group name), or
    None when its CPU backend is not a readable ``ProcessGroupGloo``."""
    if isinstance(group, str):
        group = torch_private.resolve_process_group(group)
    options = _gloo_options(group)
    return None if options is None else torch_private.gloo_threads(options)
