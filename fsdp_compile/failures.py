"""Collective failures named for what they are: which rank is gone, or which rank raised where.

When a rank exits or is killed, the others' next collective fails within the process group's
timeout with the backend's own text (gloo: ``Connection reset by peer``, ``Timed out``; NCCL:
watchdog errors). ``naming_collective_failures(what)`` re-raises such an error as a
``CollectiveError`` that says which of our steps was waiting and which rank caused it, with the
backend's error chained as its cause.

Which rank: through the default process group's store, which outlives a collective's
connections. A rank whose compiled graph raised between collectives writes what it raised and
where (``report_failure``) before closing its connections; every rank that sees a collective
fail answers a roll call and waits up to ``ROLL_CALL_SECONDS`` for the other ranks' answers:
one that never answers exited, was killed or hangs. Nothing here runs unless a collective has
already failed.
"""
from __future__ import annotations

import contextlib
import time

import torch.distributed as dist

from . import torch_private

_MARKS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "read error",
          "write error", "processgroup", "broken pipe", "socket")

ROLL_CALL_SECONDS = 2.0  # how long a rank that saw a collective fail waits for the others' answers
_PREFIX = "fsdp_compile/failures"


class CollectiveError(RuntimeError):
    """A collective of the sharded training step failed: another rank exited, was killed,
    stopped responding or abandoned its collectives after an error, or the process group broke."""


def is_collective_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and not isinstance(error, CollectiveError) and any(m in text for m in _MARKS)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@contextlib.contextmanager
def naming_collective_failures(what: str):
    try:
        yield
    except RuntimeError as error:
        failure = named_failure(what, error)
        if failure is error:
            raise
        raise failure from error


def named_failure(what: str, error: BaseException) -> BaseException:
    """``error`` as a ``CollectiveError`` naming ``what`` and the cause when it is a collective
    failure (chained to it), else ``error`` itself. For hot call wrappers, where a bare
    ``try``/``except`` costs nothing until something raises."""
    if not is_collective_failure(error):
        return error
    failure = CollectiveError(_message(what, error))
    failure.__cause__ = error
    return failure


def _message(what: str, error: BaseException) -> str:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (
        f"fsdp_compile: {what} failed on rank {rank}: {_who_failed()}. Backend said: {first_line(error)}"
    )


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None

    return torch_private.default_store()


def report_failure(text: str) -> None:
    """Tell the other ranks (through the store) that this rank ``text`` (e.g. "raised
    IndexError (...) in its compiled forward") and abandons its collectives; also answers their
    roll call. Never raises: the store may be gone too."""
    store = _store()
    if store is None:
        return
    rank = dist.get_rank()
    try:
        store.set(f"{_PREFIX}/report/{rank}", text)
        store.set(f"{_PREFIX}/alive/{rank}", "1")
    except Exception:  # noqa: BLE001 -- best effort: the store's host may be the failed rank
        pass


def _who_failed() -> str:
    """What the other ranks say, else who did not answer the roll call (see module docstring)."""
    store = _store()
    generic = "another rank exited, was killed or stopped responding, or the process group broke"
    if store is None:
        return generic
    me, world = dist.get_rank(), dist.get_world_size()
    try:
        store.set(f"{_PREFIX}/alive/{me}", "1")
        reports = _reports(store, me, world)
        if reports:
            return "; ".join(f"rank {r} {text}" for r, text in reports) + (
                "; its collectives were abandoned, so this rank's could not complete"
            )
        deadline = time.monotonic() + ROLL_CALL_SECONDS
        missing = [r for r in range(world) if r != me]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{_PREFIX}/alive/{r}"])]
            if missing:
                time.sleep(0.05)
        reports = _reports(store, me, world)
    except Exception:  # noqa: BLE001 -- the store itself is unreachable
        return (
            f"{generic}; the process group's store is unreachable too, so the rank that hosts it "
            "(rank 0 when MASTER_ADDR points at it) is gone"
        )
    if reports:
        return "; ".join(f"rank {r} {text}" for r, text in reports)
    if missing:
        named = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
        return (
            f"{generic}: {named} did not answer a roll call through the store within "
            f"{ROLL_CALL_SECONDS:g} s; look for the first error in its log"
        )
    return f"{generic}; every rank answered a roll call through the store, so look for the first error in the other ranks' logs"


def _reports(store, me: int, world: int) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for r in range(world):
        key = f"{_PREFIX}/report/{r}"
        if r != me and store.check([key]):
            found.append((r, store.get(key).decode()))
    return found

