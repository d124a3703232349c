"""Our collectives on gloo run on a one-worker twin of the user's group (``gloo_worker.py``).

gloo's two worker threads race on a status string when they finish collectives at the same time
(torch 2.13, ``ProcessGroupGloo::runLoop``). On this machine the loop in
``_two_gathers_in_flight``, run on the user's group instead of the twin, died with
``malloc(): unaligned tcache chunk detected`` within 6,000 iterations in 7 runs of 7, and
AddressSanitizer reported a double free in ``runLoop`` within 20,000. On the twin, 100,000
iterations ran clean, with and without AddressSanitizer.
"""
from __future__ import annotations

import atexit
import os
import weakref
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fsdp_compile
from fsdp_compile import gloo_worker
from fsdp_compile.gloo_worker import one_worker_group_name, worker_threads
from fsdp_compile.testing.spawn import free_port, run_ranks

_c10d = torch.ops._c10d_functional
ITERATIONS = 10_000


def _routing(rank, world):
    model = fsdp_compile.fully_shard(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), policy={nn.Linear})
    world_name = dist.group.WORLD.group_name
    names = {u.spec.group_name for u in fsdp_compile.sharding_info(model).units}
    again = fsdp_compile.fully_shard(nn.Linear(4, 4))  # a second model on the same group
    out = {
        "names": names,
        "same_twin_again": {u.spec.group_name for u in fsdp_compile.sharding_info(again).units} == names,
        "twin_threads": {worker_threads(n) for n in names},
        "user_threads": worker_threads(dist.group.WORLD),
        "user_name": world_name,
        "twin_ranks": [dist.distributed_c10d._resolve_process_group(n).size() for n in names],
        "explain": fsdp_compile.explain(model),
    }
    # The twin's gathers carry the right data, traced or not.
    name = next(iter(names))
    out["gathered"] = _c10d.wait_tensor(_c10d.all_gather_into_tensor(torch.full((2,), float(rank)), world, name))
    return out


def test_fully_shard_on_gloo_runs_its_collectives_on_a_one_worker_twin_of_the_group():
    results = run_ranks(_routing, 2)
    for rank, out in enumerate(results):
        assert len(out["names"]) == 1 and out["user_name"] not in out["names"], rank
        assert out["names"] == results[0]["names"], "every rank names the same twin"
        assert out["same_twin_again"], "a second fully_shard on the group reuses its twin"
        assert out["twin_threads"] == {1}
        assert out["user_threads"] == 2, "the user's group is left as it was made"
        assert out["twin_ranks"] == [2]
        assert out["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]
        assert "shard group: global ranks [0, 1] (our collectives: its one-worker gloo twin)" in out["explain"]


def _two_gathers_in_flight(rank, world):
    name = one_worker_group_name(dist.group.WORLD)
    x = torch.full((8,), float(rank + 1))
    want = torch.cat([torch.full((8,), 1.0), torch.full((8,), 2.0)])
    wrong = 0
    for _ in range(ITERATIONS):
        a = _c10d.all_gather_into_tensor(x, world, name)
        b = _c10d.all_gather_into_tensor(x, world, name)
        wrong += int(not torch.equal(_c10d.wait_tensor(a), want)) + int(not torch.equal(_c10d.wait_tensor(b), want))
    return wrong


@pytest.mark.slow  # about 15 s; .ci/run runs it
def test_two_gathers_in_flight_on_the_twin_finish_without_corrupting_the_heap():
    assert run_ranks(_two_gathers_in_flight, 2, timeout=240) == [0, 0]


def _after_reinit(rank, world, port):
    first = one_worker_group_name(dist.group.WORLD)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    second = one_worker_group_name(dist.group.WORLD)
    got = _c10d.wait_tensor(_c10d.all_gather_into_tensor(torch.tensor([rank + 10.0]), world, second))
    return first, second, got.tolist()


def test_a_reinitialized_world_gets_a_new_twin():
    for first, second, got in run_ranks(_after_reinit, 2, free_port()):
        assert first != second
        assert got == [10.0, 11.0]


def _after_subgroup_destroyed(rank, world):
    sub = dist.new_group([0, 1])
    twin = one_worker_group_name(sub)
    before = _c10d.wait_tensor(_c10d.all_gather_into_tensor(torch.tensor([rank + 1.0]), world, twin)).tolist()
    dist.destroy_process_group(sub)
    one_worker_group_name(dist.group.WORLD)  # the next twin lookup forgets destroyed groups' twins
    try:
        dist.distributed_c10d._resolve_process_group(twin)
        still_registered = True
    except (RuntimeError, ValueError):
        still_registered = False
    return before, still_registered


def test_the_twin_of_a_destroyed_subgroup_is_released_at_the_next_twin_lookup():
    """c10d's name registry holds groups weakly: once ``_drop_destroyed`` lets go of the twin of a
    destroyed subgroup, its name no longer resolves (its sockets and worker are gone)."""
    for before, still_registered in run_ranks(_after_subgroup_destroyed, 2):
        assert before == [1.0, 2.0]
        assert not still_registered


def _train_and_drop(rank) -> weakref.ref:
    """Two eager AdamW steps of a sharded model that goes out of scope here (its state, in
    reference cycles, still holds the groups). Returns a weak reference to the twin."""
    torch.manual_seed(0)
    model = fsdp_compile.fully_shard(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), policy={nn.Linear})
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        model(torch.randn(3, 8) + rank).sum().backward()
        opt.step()
        opt.zero_grad()
    (twin_name,) = {u.spec.group_name for u in fsdp_compile.sharding_info(model).units}
    return weakref.ref(dist.distributed_c10d._resolve_process_group(twin_name))


def _groups_at_exit(rank, world):
    with mock.patch("atexit.register", wraps=atexit.register) as register:
        twin = _train_and_drop(rank)
    user = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    alive_after_destroy = (user() is not None, twin() is not None)
    gloo_worker.release_before_exit()
    return {
        "registered": mock.call(gloo_worker.release_before_exit) in register.mock_calls,
        "alive_after_destroy": alive_after_destroy,
        "alive_after_release": (user() is not None, twin() is not None),
    }


def test_the_groups_are_destroyed_before_the_interpreter_finalizes():
    """A group alive when the interpreter finalizes can abort the process: a gloo worker releasing
    a finished work's Python-owned tensors then is ended inside a ``noexcept`` destructor
    ("terminate called without an active exception"). After ``destroy_process_group`` the
    user's group and its twin are still held (the twin table, the dropped model's cycles); the
    exit handler, registered with the first twin, destroys both before finalization."""
    for out in run_ranks(_groups_at_exit, 2):
        assert out["registered"]
        assert out["alive_after_destroy"] == (True, True), "otherwise this test proves nothing"
        assert out["alive_after_release"] == (False, False)
