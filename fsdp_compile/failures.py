"""Collective failures named for what they are: a peer rank is gone or the process group broke.

When a rank exits or is killed, the others' next collective fails within the process group's
timeout with the backend's own text (gloo: ``Connection reset by peer``, ``Timed out``; NCCL:
watchdog errors). ``naming_collective_failures(what)`` re-raises such an error as a
``CollectiveError`` that says which of our steps was waiting and what to look for, with the
backend's error chained as its cause.
"""
from __future__ import annotations

import contextlib

import torch.distributed as dist

_MARKS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "read error",
          "write error", "processgroup", "broken pipe", "socket")


class CollectiveError(RuntimeError):
    """A collective of the sharded training step failed: another rank exited, was killed or
    stopped responding, or the process group broke."""


def is_collective_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and not isinstance(error, CollectiveError) and any(m in text for m in _MARKS)


@contextlib.contextmanager
def naming_collective_failures(what: str):
    try:
        yield
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise CollectiveError(
            f"fsdp_compile: {what} failed on rank {rank}: another rank exited, was killed or "
            "stopped responding, or the process group broke; look for the first error in the "
            f"other ranks' logs. Backend said: {first_line}"
        ) from error
