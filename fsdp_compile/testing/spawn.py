"""Run a function on N local gloo ranks (spawned processes), with a hard timeout.

Every rank gets a real ``torch.distributed`` process group on 127.0.0.1 (a fresh free port), the
group is destroyed on the way out, and a rank that hangs (a mismatched collective) fails the
whole run within ``timeout`` seconds instead of hanging. Results come back pickled, by rank.

Ranks are fresh ``spawn`` processes unless ``start_ranks_from_a_forkserver`` was called (the test
suite does, in ``tests/conftest.py``): a spawned rank spends about 3 s importing torch, Dynamo and
fsdp_compile and 1 s shutting its interpreter down, against 0.05 s for a fork of a server that
imported them once. Benchmarks keep ``spawn``: they measure a fresh process's memory, and
``step.py --baseline`` makes its ranks import another checkout.
"""
from __future__ import annotations

import datetime
import gc
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankExited:
    """What ``run_ranks`` reports for a rank in ``may_exit`` that died without a result."""

    exit_code: int


_start_method = "spawn"


def start_ranks_from_a_forkserver(preload: Sequence[str]) -> None:
    """Start the ranks of every later ``run_ranks`` call by forking a server process that has
    imported ``preload`` once. A fork copies only the forking thread, so ``preload`` must not
    start threads a rank needs or that could hold a lock at the fork: importing torch,
    Inductor and fsdp_compile starts only numpy's OpenBLAS pool, which OpenBLAS stops before a
    fork (``pthread_atfork``) and restarts when used. A forked rank inherits the server's
    environment, not the caller's: ``run_ranks`` sends the caller's ``os.environ`` along, which
    covers what is read after import (``LOCAL_WORLD_SIZE``, ports), not what a preloaded module
    read when it was imported."""
    global _start_method
    mp.get_context("forkserver").set_forkserver_preload(list(preload))
    _start_method = "forkserver"


def forkserver_pid() -> int | None:
    """The pid of the server ranks are forked from, or ``None`` (spawned ranks, or not started)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None) if _start_method == "forkserver" else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, timeout, fn, args, queue, environ):
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One intra-op thread per rank: ranks share this machine's cores, and threads of several
    # ranks spin-waiting on each other cost 10-100x (the env var is too late here: torch is loaded).
    torch.set_num_threads(1)
    # The ~500k objects imported before the rank started (torch, Dynamo, Inductor) are never
    # garbage: out of the collector's generations, they are not rescanned by every full
    # collection a compile triggers (Dynamo and AOT tracing allocate millions of objects).
    gc.freeze()
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        # Plain pickle copies tensor data; multiprocessing's reducers would pass shared-memory
        # handles that die with this process.
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which re-raises
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world: int = 2, *args, timeout: float = 300.0, may_exit: frozenset = frozenset()
) -> list[Any]:
    """``[fn(rank, world, *args) for rank]`` on ``world`` spawned gloo ranks. ``fn`` must be
    importable (module level). Raises ``RuntimeError`` with the failing rank's traceback, or
    ``TimeoutError`` when a rank has not finished after ``timeout`` seconds. A rank in
    ``may_exit`` (a fault test's victim) may die without a result: its entry is then
    ``RankExited(exit_code)``."""
    ctx = mp.get_context(_start_method)
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, timeout, fn, args, queue, environ), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout + 30
    try:
        while len(results) < world:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                for r in may_exit:
                    if r not in results and procs[r].exitcode is not None:
                        results[r] = RankExited(procs[r].exitcode)
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:  # died before reporting (e.g. could not unpickle ``fn``)
                    raise RuntimeError(
                        f"run_ranks: rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                        "without a result (see its stderr above)"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"run_ranks: ranks {sorted(set(range(world)) - set(results))} did not "
                        f"finish within {timeout:.0f}s (a hung or mismatched collective?)"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def error_text(fn: Callable[[], Any], kinds: tuple[type[BaseException], ...] = (RuntimeError,)) -> str:
    """The message of the ``kinds`` exception ``fn()`` raises, or ``"no error"``: what a rank
    returns to the test when every rank must fail with a clear message."""
    try:
        fn()
    except kinds as e:
        return str(e)
    return "no error"


@dataclass(frozen=True)
class CaseFailed:
    """What ``run_case`` returns for a case that raised: its traceback, for the parent to show."""

    traceback: str


def run_case(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``CaseFailed`` with its traceback: one rank runs many cases in one spawn, and a
    failing case must not hide the others (the parent asserts on each with ``case_result``)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 -- reported to the parent
        return CaseFailed(traceback.format_exc())


def case_result(value: Any) -> Any:
    """A case's result in the parent; a ``CaseFailed`` fails the test with the rank's traceback."""
    if isinstance(value, CaseFailed):
        raise AssertionError(f"the case failed on its rank:\n{value.traceback}")
    return value

