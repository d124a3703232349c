"""Activation checkpointing on a sharded model, eager and compiled, on 2 gloo ranks.

Every way users checkpoint: ``torch.utils.checkpoint.checkpoint`` around a unit (non-reentrant
and reentrant), ``apply_activation_checkpointing`` (``checkpoint_wrapper``), selective
checkpointing (``create_selective_checkpoint_contexts``) and a region inside a unit. Each is
trained for every strategy, eagerly and compiled (``aot_eager``; FULL_SHARD also Inductor), and
compared with DDP running the same checkpointing on a copy of the model (float64, so every
difference is a bug, not rounding). One spawn runs every default case, another the slow ones
(``_in_default_run``); the parent asserts.
"""
from __future__ import annotations

import collections
import copy
import functools
import traceback
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import fsdp_compile
from fsdp_compile import collectives, fully_shard
from fsdp_compile.testing.graphs import REDUCE_SCATTER, graph_structure
from fsdp_compile.testing.loop import train_steps
from fsdp_compile.testing.memory import profile_step
from fsdp_compile.testing.reference import FLOAT64_ROUNDING
from fsdp_compile.testing.spawn import run_ranks

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
KINDS = ("nonreentrant", "reentrant", "wrapper", "selective", "inside_unit")
STEPS = 3
DIM, HIDDEN, LAYERS = 12, 40, 3


class Block(nn.Module):
    def __init__(self, inside: bool = False):
        super().__init__()
        self.inside = inside
        self.ln = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        if self.inside:  # a checkpointed region inside the unit: part of its parameters only
            return x + checkpoint(self.mlp, h, use_reentrant=False)
        return x + self.mlp(h)


def _sac_policy():
    return create_selective_checkpoint_contexts([torch.ops.aten.mm.default, torch.ops.aten.addmm.default])


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(5, DIM)
        self.blocks = nn.ModuleList(Block(inside=kind == "inside_unit") for _ in range(LAYERS))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            if self.kind == "nonreentrant":
                h = checkpoint(block, h, use_reentrant=False)
            elif self.kind == "reentrant":
                h = checkpoint(block, h, use_reentrant=True)
            elif self.kind == "selective":
                h = checkpoint(block, h, use_reentrant=False, context_fn=_sac_policy)
            else:
                h = block(h)
        return self.head(h).pow(2).mean()


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = Net(kind).double()
    if kind == "wrapper":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    return model


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)


def _train(model, forward, rank):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return train_steps(forward, opt, lambda step: batch(step, rank), STEPS)


def _full_params(model):
    with fsdp_compile.summon_full_params(model, writeback=False):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _backward_gathers(model, rank):
    """All-gathers in the second step's forward and in its backward (eager)."""
    calls = collections.Counter()
    real = collectives.all_gather_unit
    phase = ["forward"]

    def counting(*args, **kwargs):
        calls[phase[0]] += 1
        return real(*args, **kwargs)

    with mock.patch.object(collectives, "all_gather_unit", counting):
        loss = model(batch(9, rank))
        phase[0] = "backward"
        loss.backward()
    return dict(calls)


BACKENDS = {"eager": None, "aot_eager": fsdp_compile.backend(inner="aot_eager"), "inductor": "fsdp_compile"}


def ac_cases(rank: int, world: int, runs: list[tuple[str, str, str]]) -> dict:
    """Each ``(kind, strategy, mode)`` of ``runs`` trained (``mode``: a key of ``BACKENDS``),
    and DDP with the same checkpointing: ``{(kind, strategy, mode): result | traceback}``."""
    torch._dynamo.config.cache_size_limit = 64
    out = {}
    for kind in dict.fromkeys(k for k, _, _ in runs):
        ref = DDP(build(kind))
        ddp = {"losses": _train(ref, ref, rank), "params": {n: p.detach().clone() for n, p in ref.module.named_parameters()}}
        for key in [run for run in runs if run[0] == kind]:
            _, strategy, mode = key
            backend = BACKENDS[mode]
            try:
                model = fully_shard(build(kind), policy={Block}, strategy=strategy)
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                forward = model if backend is None else torch.compile(model, backend=backend, fullgraph=True)
                result = {"ddp": ddp, "losses": _train(model, forward, rank), "params": _full_params(model)}
                if backend is None:
                    result["gathers"] = _backward_gathers(model, rank)
                else:
                    result["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
                    result["structure"] = _graph_structure(model)
                out[key] = result
            except Exception:  # noqa: BLE001 -- reported by the parent
                out[key] = traceback.format_exc()
    return out


def _graph_structure(model) -> dict:
    info = fsdp_compile.sharding_info(model)
    return {"units": len(info.units), **graph_structure(info.compiled_graphs[0])}


# Every kind, strategy and mode; Inductor compiles FULL_SHARD with a checkpointing function and
# with checkpoint_wrapper.
RUNS = [(k, s, m) for k in KINDS for s in STRATEGIES for m in ("eager", "aot_eager")] + [
    ("nonreentrant", "FULL_SHARD", "inductor"), ("wrapper", "FULL_SHARD", "inductor"),
]


def _in_default_run(kind: str, strategy: str, mode: str) -> bool:
    """Every kind eagerly with FULL_SHARD and SHARD_GRAD_OP, and compiled (aot_eager) with
    FULL_SHARD; non-reentrant checkpointing eagerly in every strategy. The rest runs under the
    slow marker, in a spawn of its own: NO_SHARD all-reduces and never regathers, so one kind
    covers it eagerly; SHARD_GRAD_OP's and NO_SHARD's compiled graphs differ from FULL_SHARD's
    by the regather alone (tests/test_compiled.py compiles both without checkpointing); Inductor
    (the default suite compiles a checkpointed Hugging Face Llama with it in
    tests/test_hf_models.py)."""
    if mode == "inductor":
        return False
    if strategy == "FULL_SHARD":
        return True
    return mode == "eager" and (kind == "nonreentrant" or strategy == "SHARD_GRAD_OP")


def _params(runs) -> list:
    """``runs`` as test parameters, marked slow outside the default run and inductor with it."""
    params = []
    for run in runs:
        marks = [] if _in_default_run(*run) else [pytest.mark.slow]
        if run[2] == "inductor":
            marks.append(pytest.mark.inductor)
        params.append(pytest.param(*run, marks=marks))
    return params


@pytest.fixture(scope="module")
def default_results():
    return run_ranks(ac_cases, 2, [run for run in RUNS if _in_default_run(*run)], timeout=900)


@pytest.fixture(scope="module")
def slow_results():
    return run_ranks(ac_cases, 2, [run for run in RUNS if not _in_default_run(*run)], timeout=900)


def _results(request, kind: str, strategy: str, mode: str) -> list[dict]:
    """Every rank's result of ``(kind, strategy, mode)``, from the spawn that ran it."""
    fixture = "default_results" if _in_default_run(kind, strategy, mode) else "slow_results"
    return [_ok(rank_results, (kind, strategy, mode)) for rank_results in request.getfixturevalue(fixture)]


def _ok(rank_results, key):
    value = rank_results[key]
    assert not isinstance(value, str), f"{key} failed:\n{value}"
    return value


@pytest.mark.parametrize("kind,strategy,mode", _params(RUNS))
def test_checkpointed_training_equals_ddp_with_the_same_checkpointing(request, kind, strategy, mode):
    for got in _results(request, kind, strategy, mode):
        _assert_equals_ddp(got, kind, strategy, mode)


def _assert_equals_ddp(got: dict, kind: str, strategy: str, mode: str) -> None:
    """Eager runs DDP's ops: exact; compiled float64: to rounding (Inductor's losses: to
    float32-sized rounding, see test_compiled.INDUCTOR_FLOAT64_LOSS)."""
    tol = dict(rtol=0, atol=0) if mode == "eager" else FLOAT64_ROUNDING
    loss_tol = dict(rtol=1e-6, atol=0) if mode == "inductor" else tol
    assert_close(got["losses"], got["ddp"]["losses"], **loss_tol, msg=f"{kind} {strategy} {mode} losses")
    for name, value in got["ddp"]["params"].items():
        assert_close(got["params"][name], value, **tol, msg=f"{kind} {strategy} {mode} {name}")


@pytest.mark.parametrize("kind,strategy,mode", _params(run for run in RUNS if run[2] == "aot_eager"))
def test_compiled_checkpointing_keeps_one_gather_and_one_reduce_per_unit(request, kind, strategy, mode):
    """The region's parameter reads are lifted out of it: per unit, forward 1 all-gather;
    backward 1 all-gather (FULL_SHARD only, all units but the root) and 1 reduce-scatter;
    FULL_SHARD saves no block's gathered buffer for backward; no graph break."""
    for got in _results(request, kind, strategy, mode):
        s = got["structure"]
        n = s["units"]
        assert got["graph_breaks"] == 0
        if strategy == "NO_SHARD":
            assert s["forward"] == {} and s["backward"] == {"all_reduce": n}
            continue
        assert s["forward"] == {"all_gather_into_tensor": n}
        expected_backward = {REDUCE_SCATTER: n}
        if strategy == "FULL_SHARD":
            # every unit but the root, which stays gathered from forward to backward (FSDP2's
            # root; backend(keep_root_gathered=True)): the only gathered parameters saved
            expected_backward["all_gather_into_tensor"] = n - 1
            assert s["saved_units"] == [""], "FULL_SHARD saved a block's gathered parameters"
        else:
            assert s["saved_gathered"] > 0, "SHARD_GRAD_OP keeps its gathered parameters for backward"
        assert s["backward"] == expected_backward


@pytest.mark.parametrize("kind", ["nonreentrant", "reentrant", "wrapper", "selective"])
def test_eager_recompute_gathers_each_unit_once(default_results, kind):
    """Around a unit, FULL_SHARD's backward gathers each checkpointed unit exactly once (its
    recompute), not once per parameter read (4 per block); the root unit, not checkpointed, is
    gathered once again for the full weights its backward saved (FULL_SHARD's usual regather)."""
    for rank_results in default_results:
        got = _ok(rank_results, (kind, "FULL_SHARD", "eager"))
        units = LAYERS + 1  # blocks + root
        assert got["gathers"] == {"forward": units, "backward": units}, got["gathers"]


def memory_case(rank: int, world: int) -> dict:
    """Peak growth of one eager FULL_SHARD step of a model whose activations dominate, with and
    without checkpointing every block."""

    class Wide(nn.Module):
        def __init__(self, ac: bool):
            super().__init__()
            self.ac = ac
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4))

        def forward(self, x):
            for block in self.blocks:
                x = x + (checkpoint(block, x, use_reentrant=False) if self.ac else block(x))
            return x.square().mean()

    out = {}
    x = torch.randn(512, 64)
    for ac in (False, True):
        torch.manual_seed(0)
        model = fully_shard(Wide(ac), policy={nn.Sequential})
        model(x).backward()  # warm-up
        for p in model.parameters():
            p.grad = None
        peak, _ = profile_step(lambda: model(x).backward())
        out[ac] = peak
    return out


def test_checkpointing_lowers_the_step_peak():
    """4 blocks, batch 512: each block saves 512x256 floats (0.5 MiB) of hidden activations
    twice without checkpointing; with it, only each block's input (128 KiB) is saved."""
    for peaks in run_ranks(memory_case, 2, timeout=300):
        assert peaks[True] < 0.6 * peaks[False], peaks
