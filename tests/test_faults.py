"""Faults between ranks, each ending on every rank with an error that names the cause,
never a hang or a wrong result.

A rank that dies (mid-step, in ``clip_grad_norm_``, before or during ``fully_shard``): every
other rank stops within seconds with a ``CollectiveError`` naming what it was waiting for and
the dead rank (the one that did not answer the roll call through the store). Ranks out of step
(below: ``no_sync``, ``summon_full_params``, ``full_state_dict``, ``full_optim_state_dict`` or
``clip_grad_norm_`` on one rank, a skipped unit, a recompile for another batch shape): the
lockstep check raises, or lets them go on when nothing differs that matters. A rank that goes
on after its compiled forward raised: every rank stops, the others naming it.

Rank 1 calls ``os._exit`` (in the optimizer step it is killed by ``SIGKILL`` instead) at the
chosen point of step 1 (after one full step, so compiled runs have compiled and checked their
graphs); rank 0 must raise. Eager: in the middle of the forward
(a forward pre-hook of block 1), of the backward (a hook on the loss's gradient) and of the
optimizer step. Compiled (``aot_eager``): an exit inside the compiled forward would itself change
rank 1's graph (a graph break, which the schedule check reports instead), so the forward case
exits just before the compiled forward runs; backward and optimizer step as eager. A failure
inside the compiled backward surfaces through the autograd engine from the wrapper around the
compiled backward's call, as a ``CollectiveError`` naming the graph's units.

A dead peer during ``dcp.save`` is DCP's own collective and gives its own error (within seconds).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.nn as nn

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.spawn import RankExited, run_ranks

VICTIM_EXIT_CODE = 17


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def _die(*_):
    os._exit(VICTIM_EXIT_CODE)


def _killed(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def one_rank_dies(rank: int, world: int, where: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = fully_shard(nn.Sequential(Block(), Block(), nn.Linear(8, 2)), policy={Block})
    run = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager")) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    victim = rank == 1
    start = None
    try:
        for step in range(3):
            dying = victim and step == 1
            if step == 1:
                start = time.monotonic()
            if dying and where == "forward":
                if compiled:
                    _die()
                model[1].register_forward_pre_hook(_die)
            loss = run(torch.ones(4, 8)).sum()
            if dying and where == "backward":
                loss.register_hook(_die)
            loss.backward()
            if where == "clip_grad_norm_":
                if dying:
                    _die()
                fsdp_compile.clip_grad_norm_(model, 1.0)
            if dying and where == "step":
                _killed()  # killed, not exiting: no interpreter shutdown, no socket closed politely
            opt.step()
            opt.zero_grad()
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


CASES = [(w, c) for c in (False, True) for w in ("forward", "backward", "step")] + [("clip_grad_norm_", False)]


@pytest.mark.parametrize("where,compiled", CASES, ids=[f"{'compiled' if c else 'eager'}-{w}" for w, c in CASES])
def test_the_other_ranks_stop_with_an_error_that_names_the_cause(where, compiled):
    survivor, victim = run_ranks(one_rank_dies, 2, where, compiled, timeout=120, may_exit=frozenset({1}))
    assert victim == RankExited(-signal.SIGKILL if where == "step" else VICTIM_EXIT_CODE)
    assert survivor["type"] == "CollectiveError", survivor
    assert survivor["seconds"] < 30, survivor
    assert "another rank exited" in survivor["message"] and "rank 0" in survivor["message"], survivor
    assert "rank 1 did not answer" in survivor["message"], survivor
    if compiled and where == "backward":
        # Raised inside the autograd engine, by the compiled backward of the model's units.
        assert "compiled backward" in survivor["message"] and "'0'" in survivor["message"], survivor
    if where == "clip_grad_norm_":
        assert "clip_grad_norm_" in survivor["message"], survivor


# ---- ranks out of step ---------------------------------------------------------------------
class Chain(nn.Module):
    """Three equal blocks and a head; ``skip=True`` skips block 1 (a branch on rank-local data)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x, skip: bool = False):
        for i, block in enumerate(self.blocks):
            if not (skip and i == 1):
                x = block(x)
        return self.head(x)


def out_of_step(rank: int, world: int, odd_one: str, compiled: bool, dynamic=None, check_ranks: bool = True) -> dict:
    """Three steps; at step 1 rank 1 does ``odd_one`` differently. Returns the losses and the
    final full parameters, or the error and how long after step 1 began it came."""
    torch.manual_seed(0)
    model = fully_shard(Chain(), policy={Block}, check_ranks=check_ranks)
    backend = fsdp_compile.backend(inner="aot_eager")
    run = torch.compile(model, backend=backend, dynamic=dynamic) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, start = [], None
    try:
        for step in range(3):
            odd = rank == 1 and step == 1
            if step == 1:
                start = time.monotonic()
            x = torch.randn(5 if odd and odd_one == "batch shape" else 4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
            if odd and odd_one == "summon_full_params":
                with fsdp_compile.summon_full_params(model):
                    pass
            if odd and odd_one == "no_sync":
                with fsdp_compile.no_sync(model):
                    loss = run(x).square().mean()
                    loss.backward()
            else:
                loss = run(x, skip=odd and odd_one == "skipped unit").square().mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None, "losses": losses, "params": fsdp_compile.full_state_dict(model)}


def ddp_with_a_bigger_batch(rank: int, world: int) -> dict:
    """The independent reference for the batch-shape case: DDP on the same model, data and steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(Chain())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(3):
        rows = 5 if rank == 1 and step == 1 else 4
        x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()}}


OUT_OF_STEP = [(odd, c) for odd in ("no_sync", "summon_full_params", "skipped unit") for c in (False, True)]


@pytest.mark.parametrize("odd_one,compiled", OUT_OF_STEP, ids=[f"{o.replace(' ', '_')}-{'compiled' if c else 'eager'}" for o, c in OUT_OF_STEP])
def test_ranks_out_of_step_all_raise_naming_what_differs(odd_one, compiled):
    """One rank in ``no_sync`` or ``summon_full_params`` while the other is not, or a rank whose
    forward skips a unit: the lockstep check (five integers, one all-gather, before each forward
    and, eagerly, before each unit's forward all-gather) makes every rank raise within seconds, naming
    both sides, before any collective mismatches (compiled ranks on different graphs compare
    the graphs' schedules, which names the collectives). Without it the skipped unit is the worst case:
    the blocks have equal sizes, so rank 0's all-gather of block 1 would pair with rank 1's of
    block 2 and return a mix of two blocks' shards without any error."""
    for rank, out in enumerate(run_ranks(out_of_step, 2, odd_one, compiled, timeout=120)):
        assert out["type"] == "RuntimeError" and out["seconds"] < 20, (rank, out)
        if odd_one == "skipped unit" and compiled:
            # Both ranks run compiled graphs, so they compare the graphs' collective schedules,
            # which names what differs: rank 1's forward has one all-gather fewer.
            assert "the compiled forward graph on this rank issues collectives" in out["message"], (rank, out)
            continue
        assert "ranks are out of step" in out["message"], (rank, out)
        if odd_one != "skipped unit":
            assert odd_one in out["message"], (rank, out["message"])
        else:
            assert "all-gather of unit 'blocks.1'" in out["message"], (rank, out["message"])
            assert "all-gather of unit 'blocks.2'" in out["message"], (rank, out["message"])


class ReluBlock(nn.Module):
    """Block's parameter shapes with other code: its compiled graph differs from a Block's, its
    collectives do not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class TwoBlocks(nn.Module):
    """Two blocks (equal Blocks, or a Block and a ReluBlock), each compiled on its own, called in
    the other order when ``swap``."""

    def __init__(self, distinct: bool):
        super().__init__()
        self.first, self.second = Block(), ReluBlock() if distinct else Block()
        self.head = nn.Linear(8, 2)

    def forward(self, x, swap: bool = False):
        a, b = (self.second, self.first) if swap else (self.first, self.second)
        return self.head(b(a(x)))


def graphs_in_another_order(rank: int, world: int, distinct: bool) -> dict:
    """Three steps with each block compiled on its own (``aot_eager``); at step 1 rank 1 calls
    the blocks in the other order. Returns the error and how long after step 1 began it came."""
    torch.manual_seed(0)
    model = fully_shard(TwoBlocks(distinct), policy={Block, ReluBlock})
    backend = fsdp_compile.backend(inner="aot_eager")
    model.first.compile(backend=backend)
    model.second.compile(backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = None
    try:
        for step in range(3):
            if step == 1:
                start = time.monotonic()
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
            model(x, swap=rank == 1 and step == 1).square().mean().backward()
            opt.step()
            opt.zero_grad()
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


@pytest.mark.parametrize("distinct", [True, False], ids=["two-graphs", "one-shared-graph"])
def test_compiled_graphs_called_in_another_order_all_raise_naming_them(distinct):
    """Rank 1 calls its blocks' compiled graphs in the other order at step 1. Their collectives
    are the same (equal parameter shapes), so the graphs' ids (a CRC of their collective
    schedules) agree, and without the per-call units in the lockstep record rank 0's all-gather
    of block ``first`` would pair with rank 1's of ``second`` and train on a mix of the two
    blocks, without any error. Two graphs (a tanh and a relu block), or one graph that both
    equal blocks share: every rank raises within 10 s, naming the units each side gathers."""
    for rank, out in enumerate(run_ranks(graphs_in_another_order, 2, distinct, timeout=120)):
        assert out["type"] == "RuntimeError" and out["seconds"] < 10, (rank, out)
        message = out["message"]
        assert "ranks are out of step" in message and "compiled graph" in message, (rank, message)
        assert "(gathering 'first')" in message and "(gathering 'second')" in message, (rank, message)


@pytest.fixture(scope="module")
def batch_shape_references():
    """(eager fsdp_compile, DDP) on the batch-shape case, run once for the three tests below."""
    return run_ranks(out_of_step, 2, "batch shape", False, timeout=120), run_ranks(ddp_with_a_bigger_batch, 2, timeout=120)


@pytest.mark.parametrize("dynamic", [None, False, True], ids=["dynamic-auto", "dynamic-off", "dynamic-on"])
def test_a_rank_recompiling_for_another_batch_shape_trains_on(dynamic, batch_shape_references):
    """Rank 1 feeds a batch of 5 at step 1, rank 0 keeps 4. With dynamic shapes off or automatic,
    rank 1 compiles a second graph and rank 0 does not: its collectives are the same (they move
    parameters, not activations), so the first-call schedule comparison, which the lockstep check
    makes every rank join, passes, and both train on. The result equals eager training on the
    same batches and to DDP's (each rank's mean loss, gradients averaged over ranks)."""
    compiled = run_ranks(out_of_step, 2, "batch shape", True, dynamic, timeout=180)
    eager, ddp = batch_shape_references
    for rank in range(2):
        assert compiled[rank]["type"] is None and eager[rank]["type"] is None, (compiled[rank], eager[rank])
        torch.testing.assert_close(eager[rank]["losses"], ddp[rank]["losses"])
        torch.testing.assert_close(compiled[rank]["losses"], eager[rank]["losses"])
        assert eager[rank]["params"].keys() == ddp[rank]["params"].keys()
        for name, value in ddp[rank]["params"].items():
            torch.testing.assert_close(eager[rank]["params"][name], value, msg=name)
            torch.testing.assert_close(compiled[rank]["params"][name], value, msg=name)


# The process group's timeout (seconds) the no_sync test waits out: short, yet long enough for the
# setup collectives on a loaded machine.
NO_SYNC_TIMEOUT = 4


def test_without_the_lockstep_check_no_sync_on_one_rank_waits_for_the_timeout():
    """What ``check_ranks=False`` gives up (documents why it is on by default): rank 1 skips its
    reductions inside ``no_sync`` while rank 0 reduces, so their next collectives mismatch and
    both wait until the process group's timeout (``NO_SYNC_TIMEOUT``), then fail with a message
    that blames a dead peer. (A skipped unit or a one-rank ``summon_full_params`` is worse
    without the check: gloo aborts the process on mismatched buffer sizes.)"""
    runs = run_ranks(out_of_step, 2, "no_sync", False, None, False, timeout=NO_SYNC_TIMEOUT)
    for rank, out in enumerate(runs):
        assert out["type"] == "CollectiveError", (rank, out)
        # waited for the timeout (not an immediate error), and failed long before the harness's
        # own deadline (timeout + 30 s)
        assert NO_SYNC_TIMEOUT - 1 < out["seconds"] < NO_SYNC_TIMEOUT + 25, (rank, out)


# ---- a rank dies around fully_shard --------------------------------------------------------
def dies_around_fully_shard(rank: int, world: int, when: str) -> dict:
    """Rank 1 exits before ``fully_shard`` (after ``init_process_group``), or during it (in the
    policy callable, after the process group's one-worker twin is made); rank 0 shards."""
    if rank == 1 and when == "before":
        _die()

    def policy(module):
        if rank == 1 and when == "during":
            _die()
        return isinstance(module, Block)

    start = time.monotonic()
    try:
        fully_shard(nn.Sequential(Block(), Block(), nn.Linear(8, 2)), policy=policy)
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_rank_dying_before_or_during_fully_shard_is_named_within_seconds(when):
    """The survivor does not wait for the process group's timeout (60 s here) in the twin's
    rendezvous or the units' comparison: it raises ``CollectiveError`` naming the dead rank."""
    survivor, victim = run_ranks(dies_around_fully_shard, 2, when, timeout=60, may_exit=frozenset({1}))
    assert victim == RankExited(VICTIM_EXIT_CODE)
    assert survivor["type"] == "CollectiveError", survivor
    assert "fully_shard" in survivor["message"] and "rank 1 did not answer" in survivor["message"], survivor
    assert survivor["seconds"] < 30, survivor


# ---- one rank raises inside its forward and goes on ----------------------------------------
class Embedded(nn.Module):
    """An embedding (a bad batch holds an id out of its range), three blocks and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def skips_a_bad_batch(rank: int, world: int, compiled: bool) -> dict:
    """A "skip the bad batch" loop: rank 1's batch at step 1 holds an id out of the embedding's
    range; its forward raises ``IndexError``, which rank 1 catches and goes on from."""
    torch.manual_seed(0)
    model = fully_shard(Embedded(), policy={Block})
    run = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager")) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start, skipped = None, []
    try:
        for step in range(4):
            if step == 1:
                start = time.monotonic()
            ids = torch.arange(4).view(2, 2) + step
            if rank == 1 and step == 1:
                ids[0, 0] = 99
            try:
                loss = run(ids).square().mean()
            except IndexError:
                skipped.append(step)
                continue
            loss.backward()
            opt.step()
            opt.zero_grad()
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start,
                "skipped": skipped}
    return {"type": None, "skipped": skipped}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_rank_skipping_a_batch_its_forward_raised_on_stops_every_rank(compiled):
    """Eagerly, the skipping rank's next forward meets the other rank's next unit all-gather in
    the lockstep check: "ranks are out of step". Compiled, the raising rank's graph stopped
    between collectives: it tells the others through the store which rank raised what where,
    and closes its one-worker group, so the other rank's pending collective fails at once with
    a ``CollectiveError`` that says so; the raising rank's next forward raises without
    communicating."""
    rank0, rank1 = run_ranks(skips_a_bad_batch, 2, compiled, timeout=60)
    assert rank1["skipped"] == [1], rank1
    for rank, out in enumerate((rank0, rank1)):
        assert out["type"] is not None and out["seconds"] < 30, (rank, out)
    if not compiled:
        for rank, out in enumerate((rank0, rank1)):
            assert out["type"] == "RuntimeError" and "ranks are out of step" in out["message"], (rank, out)
        return
    assert rank0["type"] == "CollectiveError", rank0
    assert "rank 1 raised IndexError" in rank0["message"] and "compiled forward" in rank0["message"], rank0
    assert rank1["type"] == "RuntimeError", rank1
    assert "this rank's compiled forward" in rank1["message"] and "IndexError" in rank1["message"], rank1


# ---- collective calls made by one rank only --------------------------------------------------
def one_rank_calls(rank: int, world: int, call: str, compiled: bool) -> dict:
    """Three steps; at step 1, between backward and optimizer step, rank 1 alone calls ``call``."""
    torch.manual_seed(0)
    model = fully_shard(Chain(), policy={Block})
    run = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager")) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    start = None
    try:
        for step in range(3):
            if step == 1:
                start = time.monotonic()
            run(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            if rank == 1 and step == 1:
                if call == "full_state_dict":
                    fsdp_compile.full_state_dict(model)
                elif call == "full_optim_state_dict":
                    fsdp_compile.full_optim_state_dict(model, opt)
                else:
                    fsdp_compile.clip_grad_norm_(model, 1.0)
            opt.step()
            opt.zero_grad()
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


ONE_RANK = [("full_state_dict", False), ("full_optim_state_dict", False), ("clip_grad_norm_", False),
            ("clip_grad_norm_", True)]


@pytest.mark.parametrize("call,compiled", ONE_RANK, ids=[f"{c}-{'compiled' if k else 'eager'}" for c, k in ONE_RANK])
def test_a_collective_call_on_one_rank_only_is_out_of_step(call, compiled):
    """``full_state_dict``, ``full_optim_state_dict`` (DTensor all-gathers on the user's group)
    and ``clip_grad_norm_`` (whose norm exchange is the lockstep record itself) on one rank
    while the other goes on training: both ranks raise "ranks are out of step" naming the call,
    instead of a size mismatch that aborts the process (state dicts) or a wait for the process
    group's timeout (``clip_grad_norm_``)."""
    for rank, out in enumerate(run_ranks(one_rank_calls, 2, call, compiled, timeout=60)):
        assert out["type"] == "RuntimeError" and "ranks are out of step" in out["message"], (rank, out)
        assert call in out["message"] and out["seconds"] < 30, (rank, out)


# ---- a dead peer during dcp.save -----------------------------------------------------------
def dies_before_dcp_save(rank: int, world: int, path: str) -> dict:
    import torch.distributed.checkpoint as dcp

    model = fully_shard(nn.Sequential(Block(), nn.Linear(8, 2)), policy={Block})
    if rank == 1:
        _die()
    start = time.monotonic()
    try:
        dcp.save(model.state_dict(), checkpoint_id=path)
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


def test_a_dead_peer_during_dcp_save_gives_dcps_own_error_within_seconds(tmp_path):
    """DCP's save is DCP's own collective (its planner's gather and scatter on the user's
    group): a dead peer surfaces as DCP's error, not ours, but within seconds, not after the
    process group's timeout (60 s here). The README's guarantees say so."""
    survivor, victim = run_ranks(dies_before_dcp_save, 2, str(tmp_path / "ckpt"), timeout=60, may_exit=frozenset({1}))
    assert victim == RankExited(VICTIM_EXIT_CODE)
    assert survivor["type"] is not None and survivor["type"] != "CollectiveError", survivor
    assert survivor["seconds"] < 30, survivor
