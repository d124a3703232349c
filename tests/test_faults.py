"""A rank that dies mid-step (issue 16): every other rank stops within seconds with a
``CollectiveError`` naming what it was waiting for and the cause, never a hang.

Rank 1 calls ``os._exit`` at the chosen point of step 1 (after one full step, so compiled runs
have compiled and checked their graphs); rank 0 must raise. Eager: in the middle of the forward
(a forward pre-hook of block 1), of the backward (a hook on the loss's gradient) and of the
optimizer step. Compiled (``aot_eager``): an exit inside the compiled forward would itself change
rank 1's graph (a graph break, which the schedule check reports instead), so the forward case
exits just before the compiled forward runs; backward and optimizer step as eager.

Not turned into a named error: a failure raised inside the compiled *backward* comes from the
autograd engine running our compiled graph, where it cannot be wrapped; it arrives as the
backend's own error (gloo: "Connection reset by peer ... remote worker"), still within seconds.
"""
from __future__ import annotations

import os
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
            if dying and where == "step":
                _die()
            opt.step()
            opt.zero_grad()
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"type": None}


CASES = [(w, c) for c in (False, True) for w in ("forward", "backward", "step")]


@pytest.mark.parametrize("where,compiled", CASES, ids=[f"{'compiled' if c else 'eager'}-{w}" for w, c in CASES])
def test_the_other_ranks_stop_with_an_error_that_names_the_cause(where, compiled):
    survivor, victim = run_ranks(one_rank_dies, 2, where, compiled, timeout=120, may_exit=frozenset({1}))
    assert victim == RankExited(VICTIM_EXIT_CODE)
    assert survivor["type"] is not None, "rank 0 finished its steps although rank 1 died"
    assert survivor["seconds"] < 30, survivor
    if compiled and where == "backward":
        assert survivor["type"] == "RuntimeError" and "Connection reset by peer" in survivor["message"], survivor
        return
    assert survivor["type"] == "CollectiveError", survivor
    assert "another rank exited" in survivor["message"] and "rank 0" in survivor["message"], survivor
