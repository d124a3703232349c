"""Long runs: 1,000 AdamW steps of the README GPT on 2 gloo ranks, checked at every 100th step
against DDP (the independent reference): eager, compiled with ``aot_eager`` (with the default
``overlap_reductions=True`` and with ``False``) and compiled with Inductor.

Every model starts from the same seed and sees the same batches (random tokens: the loss stays
near ln(96), there is nothing to learn, which makes it a pure test of drift). Eager and
``aot_eager`` run the same ATen ops as DDP on the same inputs (a reduce-scatter of two ranks'
gradients adds the same two numbers as DDP's all-reduce): the stated tolerance is equality.
Inductor fuses and reorders float32 reductions, so its numbers drift from DDP's by rounding.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fsdp_compile
from fsdp_compile.testing.gpt import GPT, Block, gpt_batch
from fsdp_compile.testing.loop import train_steps
from fsdp_compile.testing.spawn import run_ranks

# five 1,000-step runs on 2 ranks in one module fixture: longer than the suite-wide 600 s timeout
pytestmark = pytest.mark.timeout(2400)

STEPS, EVERY = 1000, 100
# Loss difference allowed at a checked step, and parameter difference (max abs) at the end,
# against DDP. Eager and aot_eager reproduce DDP bit for bit over 1,000 steps.
EXACT = {"loss": 0.0, "param": 0.0}
NAMES = ("ddp", "eager", "compiled", "compiled_no_overlap", "inductor")


def long_run(rank: int, world: int) -> dict:
    out = {}
    for name in NAMES:
        torch.manual_seed(0)
        if name == "ddp":
            model = forward = DDP(GPT())
        else:
            # check_ranks=False: one process pair in lockstep by construction; the per-unit
            # exchange would add a fifth to the eager steps and nothing to what is tested
            model = forward = fsdp_compile.fully_shard(GPT(), policy={Block}, check_ranks=False)
        if name.startswith("compiled"):
            # the default overlap: two collectives in flight through each backward (what used to
            # hit gloo's heap race, gloo_worker.py)
            backend = fsdp_compile.backend(inner="aot_eager", overlap_reductions=name == "compiled")
            forward = torch.compile(model, backend=backend, fullgraph=True)
        elif name == "inductor":
            forward = torch.compile(model, backend="fsdp_compile", fullgraph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for start in range(0, STEPS, EVERY):
            losses.extend(train_steps(forward, opt, lambda step: gpt_batch(step, rank), EVERY, start=start))
        params = model.module.state_dict() if name == "ddp" else fsdp_compile.full_state_dict(model)
        out[name] = {"losses": losses[EVERY - 1 :: EVERY], "params": {k: v.detach().clone() for k, v in params.items()}}
    return out


@pytest.fixture(scope="module")
def long_runs():
    return run_ranks(long_run, 2, timeout=2400)


def _assert_stays_with_ddp(runs, name, tolerance):
    for rank, out in enumerate(runs):
        ddp, got = out["ddp"], out[name]
        assert len(set(ddp["losses"])) == len(ddp["losses"]), ddp["losses"]  # it trained: every loss differs
        diffs = [abs(a - b) for a, b in zip(ddp["losses"], got["losses"])]
        assert len(diffs) == STEPS // EVERY
        assert max(diffs) <= tolerance["loss"], f"rank {rank} {name}: loss differences at every {EVERY}th step {diffs}"
        assert got["params"].keys() == ddp["params"].keys()
        worst = max((ddp["params"][k] - got["params"][k]).abs().max().item() for k in ddp["params"])
        assert worst <= tolerance["param"], f"rank {rank} {name}: largest parameter difference after {STEPS} steps {worst}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eager", "compiled", "compiled_no_overlap"])
def test_thousand_steps_eager_and_aot_eager_stay_with_ddp(long_runs, name):
    _assert_stays_with_ddp(long_runs, name, EXACT)


@pytest.mark.slow
@pytest.mark.inductor
def test_thousand_steps_inductor_stays_with_ddp(long_runs):
    """Inductor's fused float32 rounding keeps its losses within 5e-7 of DDP's for the first 600
    steps, then the trajectories part (1e-2 on the loss and 0.2 on a parameter by step 1,000,
    measured): the check is the first 500 steps' losses, where a wrong reduction would show."""
    for rank, out in enumerate(long_runs):
        ddp, got = out["ddp"]["losses"][:5], out["inductor"]["losses"][:5]
        diffs = [abs(a - b) for a, b in zip(ddp, got)]
        assert len(diffs) == 5 and max(diffs) <= 1e-5, f"rank {rank} inductor: loss differences {diffs}"
