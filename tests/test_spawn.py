"""``run_ranks``, the helper every multi-rank test starts its gloo ranks with.

The suite forks ranks from a server that imported torch and fsdp_compile once
(``tests/conftest.py``); this test pins what that must not change against a spawned rank: the
caller's environment at the call, one intra-op thread, a fresh default process group, and state
that does not leak from one call's ranks into the next's.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fsdp_compile.testing.spawn import forkserver_pid, run_ranks


def _what_a_rank_sees(rank: int, world: int, names: tuple[str, ...]) -> dict:
    seen = {name: os.environ.get(name) for name in names}
    marker = getattr(torch, "_fsdp_compile_spawn_test_marker", None)
    torch._fsdp_compile_spawn_test_marker = rank  # must not be visible to the next call's ranks
    gathered = [None] * world
    dist.all_gather_object(gathered, rank * 10)
    return {
        "env": seen,
        "parent": os.getppid(),
        "threads": torch.get_num_threads(),
        "group": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "gathered": gathered,
        "marker_from_an_earlier_call": marker,
    }


def test_ranks_see_the_callers_environment_at_the_call_and_start_fresh(monkeypatch):
    names = ("FSDP_COMPILE_SPAWN_TEST_CHANGED", "FSDP_COMPILE_SPAWN_TEST_REMOVED", "MASTER_ADDR")
    monkeypatch.setenv("FSDP_COMPILE_SPAWN_TEST_REMOVED", "only in the first call")
    # The second call runs after the first started the server: its ranks must see the
    # environment as it is at the call, and nothing the first call's ranks did.
    for call, value in enumerate(("first", "second")):
        monkeypatch.setenv("FSDP_COMPILE_SPAWN_TEST_CHANGED", value)
        if call == 1:
            monkeypatch.delenv("FSDP_COMPILE_SPAWN_TEST_REMOVED")
        seen = run_ranks(_what_a_rank_sees, 3, names, timeout=120)
        server = forkserver_pid()  # started by the first call
        for rank, got in enumerate(seen):
            assert got["env"] == {
                "FSDP_COMPILE_SPAWN_TEST_CHANGED": value,
                "FSDP_COMPILE_SPAWN_TEST_REMOVED": "only in the first call" if call == 0 else None,
                "MASTER_ADDR": "127.0.0.1",
            }
            assert got["threads"] == 1
            assert got["group"] == (rank, 3, "gloo")
            assert got["gathered"] == [0, 10, 20]
            assert got["marker_from_an_earlier_call"] is None
            assert got["parent"] == (server if server is not None else os.getpid())
