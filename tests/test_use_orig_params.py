"""use_orig_params behaviours of a sharded model, eager and compiled, on 2 gloo ranks.

Every behaviour runs for FULL_SHARD, SHARD_GRAD_OP and NO_SHARD, eagerly and under
``torch.compile`` (``fsdp_compile.backend(inner="aot_eager")``; behaviour 1 also with the default
Inductor backend). The default suite runs every strategy eagerly and FULL_SHARD compiled with
``aot_eager``; the other compiled cases run under the slow marker (``_in_default_run``).
The independent reference is ``DistributedDataParallel`` over a deepcopy of the same seeded
model fed the same per-rank data (DDP averages gradients over ranks, as we do), or the
reference's dim-0 rows where a shard is compared. Exact numbers: ``torch.testing.assert_close``
with its defaults in eager mode, ``rtol=1e-4, atol=1e-5`` compiled.

To keep the suite fast, one spawn (a module-scoped fixture) runs every case of every selected
behaviour; each rank returns ``{(behaviour, case): None | traceback}`` and ``test_behaviour[name]``
reports every failing case of its behaviour at once. Compiling is what costs time, so compiled
cases reuse one compiled model where the behaviour allows it: every behaviour that trains a plain
``Net`` from its seeded start runs on one shared model per strategy and mode (``_shared``), reset
between cases, and compiled once (a frozen bias adds a graph); the cases run strategy by strategy
(``_run_plan``).
"""
from __future__ import annotations

import copy
import itertools
import re
import sys
import traceback
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import MixedPrecision, collectives, fully_shard, load_full_state_dict, no_sync, summon_full_params
from fsdp_compile.testing.graphs import REDUCE_SCATTER
from fsdp_compile.testing.spawn import run_ranks

WORLD = 2
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
MODES = ("eager", "compiled")
EAGER_TOL: dict = {}
COMPILED_TOL = {"rtol": 1e-4, "atol": 1e-5}


# ---- models ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """A unit under ``policy={Block}``: two Linear layers with biases (odd sizes: padded shards)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin1 = nn.Linear(d_in, d_out)
        self.lin2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin2(torch.relu(self.lin1(x))))


class Net(nn.Module):
    """Two Block units, a root unit (head + ``scale``: neither a weight nor a bias)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(6, 7), Block(7, 7))
        self.head = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)) * self.scale


class ProbeNet(Net):
    """Records what ``self.named_parameters()`` yields inside its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = [(name, tuple(p.shape)) for name, p in self.named_parameters()]
        return super().forward(x)


class TiedNet(nn.Module):
    """Embedding tied to the output head, and ``blocks.1.lin1.weight`` is ``blocks.0.lin1.weight``
    (one parameter used by two units: it belongs to the root unit, their common ancestor)."""

    def __init__(self, vocab: int = 11, dim: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(Block(dim, dim), Block(dim, dim))
        self.blocks[1].lin1.weight = self.blocks[0].lin1.weight
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(idx)))


class ManyTiny(nn.Module):
    """``2 * n`` parameters (``n`` Linear(4, 1) in 10 units) of dim 0 = 1 < world size: every
    shard on rank 1 is empty."""

    def __init__(self, n: int = 500):
        super().__init__()
        self.groups = nn.ModuleList(TinyGroup(n // 10) for _ in range(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(g(x) for g in self.groups)


class TinyGroup(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x) for lin in self.lins], dim=1)


# ---- helpers (run inside the ranks) ----------------------------------------------------------------
def _batch(step: int, rank: int, d_in: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, d_in, generator=g)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def _tol(mode: str) -> dict:
    return EAGER_TOL if mode == "eager" else COMPILED_TOL


def _shard(full: torch.Tensor, rank: int, strategy: str) -> torch.Tensor:
    """This rank's dim-0 rows of ``full`` (the whole tensor for NO_SHARD)."""
    if strategy == "NO_SHARD":
        return full
    rows = -(-full.shape[0] // WORLD)
    return full[rank * rows : (rank + 1) * rows]


def _close(got, want, mode: str, what: str) -> None:
    assert_close(got, want, msg=lambda m: f"{what}: {m}", **_tol(mode))


def _build(strategy: str, mode: str, model_fn: Callable[[], nn.Module] = Net, *, mp=None,
           inner: str = "aot_eager", before_shard: Callable | None = None):
    """Seeded ``model_fn()`` sharded by ``policy={Block, TinyGroup}``; its DDP reference; the callable to run
    (the model, or ``torch.compile`` of it). ``before_shard(model)`` runs before ``fully_shard``."""
    torch.manual_seed(0)
    model = model_fn()
    ddp = DDP(copy.deepcopy(model))
    extra = before_shard(model) if before_shard is not None else None
    fully_shard(model, policy={Block, TinyGroup}, strategy=strategy, mixed_precision=mp)
    run = model
    if mode == "compiled":  # (``_run_plan`` resets Dynamo once per strategy, not per model)
        backend = "fsdp_compile" if inner == "inductor" else fsdp_compile.backend(inner=inner)
        run = torch.compile(model, backend=backend, fullgraph=True)
    return model, run, ddp, extra


# (strategy, mode, inner) -> (model, run, template, initial); ``_run_plan`` clears it per strategy.
_SHARED: dict = {}


def _shared(strategy: str, mode: str, inner: str = "aot_eager", freeze=None):
    """``_build``'s 4-tuple for a ``Net`` shared by every behaviour that trains a plain ``Net``
    from its seeded start: built and compiled once per (strategy, mode, inner), then reset for
    each case (full values reloaded, every ``.grad`` None, ``requires_grad`` True, or ``freeze``
    applied) with a fresh DDP reference over a copy of the seeded model (frozen alike before DDP
    is built). A case leaving state behind that the reset misses fails the cases after it. The
    4th element: one optimizer per ``OPTIMIZER_VARIANTS`` entry, built before ``fully_shard``
    (behaviour 1; it runs first, before behaviour 6 replaces a parameter object)."""
    key = (strategy, mode, inner)
    if key not in _SHARED:
        model, run, ddp, before = _build(strategy, mode, inner=inner, before_shard=_optimizers_per_variant)
        _SHARED[key] = (model, run, copy.deepcopy(ddp.module), fsdp_compile.full_state_dict(model), before)
    model, run, template, initial, before = _SHARED[key]
    load_full_state_dict(model, initial)
    reference = copy.deepcopy(template)
    for module in (model, reference):
        for p in module.parameters():
            p.grad = None
            p.requires_grad_(True)
        if freeze is not None:
            freeze(module)
    return model, run, DDP(reference), before


def _assert_compiled(model: nn.Module, mode: str) -> None:
    if mode == "compiled":
        graphs = fsdp_compile.sharding_info(model).compiled_graphs
        assert graphs and all(g.schedules.get("forward") is not None for g in graphs), graphs


def _check_full_params(model, ddp, mode: str, what: str) -> None:
    want = dict(ddp.module.named_parameters())
    with summon_full_params(model, writeback=False):
        got = dict(model.named_parameters())
        assert list(got) == list(want), (list(got), list(want))
        for name in want:
            _close(got[name].detach(), want[name].detach(), mode, f"{what}: full param {name}")


def _check_shards(model, ddp, rank: int, strategy: str, mode: str, what: str, grads: bool = False) -> None:
    want = dict(ddp.module.named_parameters())
    got = dict(model.named_parameters())
    assert list(got) == list(want), (list(got), list(want))
    for name, ref in want.items():
        p = got[name]
        _close(p.detach(), _shard(ref.detach(), rank, strategy), mode, f"{what}: shard {name}")
        if grads:
            assert (p.grad is None) == (ref.grad is None), f"{what}: {name}.grad {p.grad} vs {ref.grad}"
            if ref.grad is not None:
                _close(p.grad, _shard(ref.grad, rank, strategy), mode, f"{what}: grad of {name}")


def _grid(*extra) -> list[tuple]:
    return [(s, m, *e) for s in STRATEGIES for m in MODES for e in itertools.product(*extra)]


def _backward_compare_step(loss, ref_loss, model, ddp, opt, ref_opt, rank, strategy, mode, step, before_step=None):
    """Backward both, compare the loss and this rank's gradient shards with DDP's,
    ``before_step()`` if given, step, zero."""
    loss.backward(), ref_loss.backward()
    _close(loss.detach(), ref_loss.detach(), mode, f"loss at step {step}")
    _check_shards(model, ddp, rank, strategy, mode, f"step {step}", grads=True)
    if before_step is not None:
        before_step()
    opt.step(), ref_opt.step()
    opt.zero_grad(), ref_opt.zero_grad()


# ---- behaviour 1: parameter groups ---------------------------------------------------------------
OPTIMIZER_VARIANTS = list(itertools.product(("Adam", "AdamW"), (True, False), (True, False)))


def _param_groups(named_params):
    weights, biases, rest = [], [], []
    for name, p in named_params:
        (weights if name.endswith("weight") else biases if name.endswith("bias") else rest).append(p)
    return [
        {"params": weights, "lr": 1e-2, "weight_decay": 0.1},
        {"params": biases, "lr": 1e-3, "weight_decay": 0.01},
        {"params": rest},
    ]


def _variant_optimizer(module: nn.Module, variant: tuple) -> torch.optim.Optimizer:
    opt_name, foreach, _ = variant
    return getattr(torch.optim, opt_name)(_param_groups(module.named_parameters()), lr=5e-3, foreach=foreach)


def _optimizers_per_variant(module: nn.Module) -> list:
    return [_variant_optimizer(module, variant) for variant in OPTIMIZER_VARIANTS]


# Steps of each parameter-group variant: each zero_grad placement (before forward, before
# backward) twice.
PARAM_GROUP_STEPS = 4


def _train_param_groups(rank, model, run, ddp, opt, variant, mode, label: str = "") -> None:
    set_to_none = variant[2]
    label = f"{label}{variant}"
    ref_opt = _variant_optimizer(ddp.module, variant)
    for step in range(PARAM_GROUP_STEPS):
        x = _batch(step, rank)
        losses = []
        for o, fwd in ((opt, run), (ref_opt, ddp)):
            if step % 2 == 0:
                o.zero_grad(set_to_none=set_to_none)
            loss = _loss(fwd(x))
            if step % 2 == 1:
                o.zero_grad(set_to_none=set_to_none)
            loss.backward()
            o.step()
            losses.append(loss.detach())
        _close(*losses, mode, f"{label}: loss at step {step}")
    _check_full_params(model, ddp, mode, f"{label}: after {PARAM_GROUP_STEPS} steps")


def param_groups(rank, strategy, mode, inner="aot_eager"):
    """Three groups (weights lr 1e-2 wd 0.1, biases lr 1e-3 wd 0.01, ``scale`` default), Adam and
    AdamW, foreach on/off, zero_grad(set_to_none on/off) before forward on even steps and before
    backward on odd steps; the optimizer built after ``fully_shard`` (one model, reset between
    variants) and before it (the shared model holds one per variant, all built before
    ``fully_shard``). Inductor: one variant, optimizers built after ``fully_shard``."""
    variants = OPTIMIZER_VARIANTS if inner == "aot_eager" else [("AdamW", True, True)]
    for variant in variants:
        model, run, ddp, _ = _shared(strategy, mode, inner)
        _train_param_groups(rank, model, run, ddp, _variant_optimizer(model, variant), variant, mode)
        _assert_compiled(model, mode)
    if inner != "aot_eager":
        return
    # Built before fully_shard (by ``_shared``): they hold the parameter objects, which became the shards.
    for variant, opt in zip(variants, _shared(strategy, mode)[3]):
        model, run, ddp, _ = _shared(strategy, mode)
        assert [id(p) for g in opt.param_groups for p in g["params"]] == [
            id(p) for g in _param_groups(model.named_parameters()) for p in g["params"]
        ]
        _train_param_groups(rank, model, run, ddp, opt, variant, mode, "built before fully_shard ")
        _assert_compiled(model, mode)


# ---- behaviour 2: frozen parameters --------------------------------------------------------------
def _freeze_biases(module):
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(False)


def frozen(rank, strategy, mode):
    """``requires_grad_(False)`` on every bias after sharding: units mix frozen and trainable."""
    model, run, ddp, _ = _shared(strategy, mode, freeze=_freeze_biases)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)

    def biases_stay_frozen():
        for name, p in model.named_parameters():
            assert p.requires_grad == (not name.endswith("bias")), name
            assert (p.grad is None) == name.endswith("bias"), f"step {step}: {name}.grad is {p.grad}"

    for step in range(4):
        x = _batch(step, rank)
        loss, ref_loss = _loss(run(x)), _loss(ddp(x))
        _backward_compare_step(loss, ref_loss, model, ddp, opt, ref_opt, rank, strategy, mode, step, biases_stay_frozen)
    _check_full_params(model, ddp, mode, "after 4 steps")
    _assert_compiled(model, mode)


# ---- behaviour 3: several optimizers over one unit -------------------------------------------------
def _two_optimizers(module):
    named = list(module.named_parameters())
    weights = [p for n, p in named if n.endswith("weight")]
    others = [p for n, p in named if not n.endswith("weight")]
    return torch.optim.Adam(weights, lr=1e-2), torch.optim.AdamW(others, lr=1e-2)


def several_optimizers(rank, strategy, mode):
    """Adam on the weights, AdamW on the rest; only the weights' grads are set to ``None`` between
    steps (the rest accumulate), and on step 2 the rest are zeroed (not ``None``: AdamW steps them)."""
    model, run, ddp, _ = _shared(strategy, mode)
    opt_w, opt_b = _two_optimizers(model)
    ref_w, ref_b = _two_optimizers(ddp.module)
    for step in range(4):
        x = _batch(step, rank)
        if step > 0:
            opt_w.zero_grad(set_to_none=True), ref_w.zero_grad(set_to_none=True)
        if step == 2:
            opt_b.zero_grad(set_to_none=False), ref_b.zero_grad(set_to_none=False)
        before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        out = run(x)
        for name, p in model.named_parameters():
            if name.endswith("weight") or step == 0:
                assert p.grad is None, f"step {step}: {name}.grad after forward is {p.grad}"
            else:
                assert p.grad is not None and torch.equal(p.grad, before[name]), f"step {step}: {name}.grad changed"
                assert step != 2 or not p.grad.any(), f"{name}.grad was zeroed"
        loss, ref_loss = _loss(out), _loss(ddp(x))
        loss.backward(), ref_loss.backward()
        _close(loss.detach(), ref_loss.detach(), mode, f"loss at step {step}")
        _check_shards(model, ddp, rank, strategy, mode, f"step {step}", grads=True)
        for o in (opt_w, opt_b, ref_w, ref_b):
            o.step()
    steps = [int(s["step"]) for o in (opt_w, opt_b) for s in o.state.values()]
    ref_steps = [int(s["step"]) for o in (ref_w, ref_b) for s in o.state.values()]
    assert steps == ref_steps and set(steps) == {4}, (steps, ref_steps)
    _check_full_params(model, ddp, mode, "after 4 steps")
    _assert_compiled(model, mode)


# ---- behaviour 4: several forwards before one backward ---------------------------------------------
def several_forwards(rank, strategy, mode):
    """``loss = m(x1) + m(x2 + 1)`` then one backward; on step 1 a summon_full_params (default
    writeback) sits between the two forwards."""
    model, run, ddp, _ = _shared(strategy, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for step in range(3):
        x1, x2 = _batch(step, rank), _batch(step + 50, rank)
        first = _loss(run(x1))
        if step == 1:
            _check_full_params(model, ddp, mode, "summon_full_params between two forwards")
            with summon_full_params(model):
                pass
        loss = first + _loss(run(x2 + 1))
        ref_loss = _loss(ddp(x1)) + _loss(ddp(x2 + 1))
        _backward_compare_step(loss, ref_loss, model, ddp, opt, ref_opt, rank, strategy, mode, step)
    _check_full_params(model, ddp, mode, "after 3 steps")
    _assert_compiled(model, mode)


# ---- behaviour 5: parameter access -----------------------------------------------------------------
def param_access(rank, strategy, mode):
    """After a forward: clean names, ``nn.Parameter`` shards equal to the reference's rows, the
    attribute is the same object; inside the forward: clean names and full shapes."""
    model, run, ddp, _ = _build(strategy, mode, ProbeNet)
    x = _batch(0, rank)
    out = run(x)
    want = dict(ddp.module.named_parameters())
    assert model.seen == [(n, tuple(p.shape)) for n, p in want.items()], model.seen
    _check_shards(model, ddp, rank, strategy, mode, "after forward", grads=True)
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        assert type(p) is nn.Parameter and getattr(modules[owner], attr) is p, name
        assert tuple(p.shape) == tuple(_shard(want[name], rank, strategy).shape), (name, p.shape)
    _loss(out).backward()
    _loss(ddp(x)).backward()
    _check_shards(model, ddp, rank, strategy, mode, "after backward", grads=True)
    _assert_compiled(model, mode)


# ---- behaviour 6: parameter writeback ---------------------------------------------------------------
def _shape_error(fqn: str, got: tuple, want: tuple) -> str:
    return rf"'{fqn}'.*{re.escape(str(got))}.*{re.escape(str(want))}"


def param_writeback(rank, strategy, mode, how):
    """``lin1.weight = nn.Parameter(t)`` (how="parameter") or ``lin1.weight.data = t`` ("data"):
    a wrong shape raises at the next forward / summon_full_params and corrupts nothing; the
    shard's shape takes effect in summon_full_params, the next forward, backward and step."""
    model, run, ddp, _ = _shared(strategy, mode)
    lin, ref_lin = model.blocks[0].lin1, ddp.module.blocks[0].lin1
    fqn, full_shape = "blocks.0.lin1.weight", tuple(ref_lin.weight.shape)
    shard_shape = tuple(_shard(ref_lin.weight, rank, strategy).shape)
    x = _batch(0, rank)
    original, original_data = lin.weight, lin.weight.data

    wrong = torch.zeros(full_shape[0] + 1, full_shape[1] + 2)
    if how == "parameter":
        lin.weight = nn.Parameter(wrong)
    else:
        lin.weight.data = wrong
    pattern = _shape_error(fqn, tuple(wrong.shape), shard_shape)
    with pytest.raises(RuntimeError, match=pattern):
        run(x)
    assert not fsdp_compile.sharding_info(model).in_forward
    with pytest.raises(RuntimeError, match=pattern):
        with summon_full_params(model):
            pass
    assert not fsdp_compile.sharding_info(model).summoned
    if how == "parameter":
        lin.weight = original
    else:
        original.data = original_data
    assert lin.weight is original and torch.equal(wrong, torch.zeros_like(wrong))
    _check_shards(model, ddp, rank, strategy, mode, "after the wrong-shape writes")
    _close(run(x).detach(), ddp(x).detach(), mode, "output after the wrong-shape writes")

    new_full = torch.randn(full_shape, generator=torch.Generator().manual_seed(7))
    new_shard = _shard(new_full, rank, strategy).clone()
    if how == "parameter":
        lin.weight = nn.Parameter(new_shard)
        assert lin.weight is dict(model.named_parameters())[fqn]
    else:
        lin.weight.data = new_shard
        assert lin.weight is original
    with torch.no_grad():
        ref_lin.weight.copy_(new_full)
    with summon_full_params(model):
        assert_close(lin.weight.detach(), new_full, rtol=0, atol=0)
    assert torch.equal(lin.weight.detach(), new_shard)
    _check_shards(model, ddp, rank, strategy, mode, "after the writes")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for step in range(2):
        x = _batch(step, rank)
        loss, ref_loss = _loss(run(x)), _loss(ddp(x))
        _close(loss.detach(), ref_loss.detach(), mode, f"loss at step {step}")
        loss.backward(), ref_loss.backward()
        _check_shards(model, ddp, rank, strategy, mode, f"step {step}", grads=True)
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    _check_full_params(model, ddp, mode, "after 2 steps")
    _assert_compiled(model, mode)


# ---- behaviour 7: gradient writeback -----------------------------------------------------------------
EDITED = ("blocks.0.lin1.weight", "blocks.1.lin2.bias", "head.bias")


def grad_writeback(rank, strategy, mode, how):
    """After a backward, ``p.grad = g`` ("grad"), ``p.grad.data = g`` ("grad.data") or
    ``p.grad = None`` ("none") on a few parameters: the optimizer steps on it, and the next
    backward (no zero_grad) accumulates onto it."""
    model, run, ddp, _ = _shared(strategy, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    params, ref_params = dict(model.named_parameters()), dict(ddp.module.named_parameters())
    for step in range(3):
        x = _batch(step, rank)
        loss, ref_loss = _loss(run(x)), _loss(ddp(x))
        loss.backward(), ref_loss.backward()
        _close(loss.detach(), ref_loss.detach(), mode, f"loss at step {step}")
        _check_shards(model, ddp, rank, strategy, mode, f"backward {step}", grads=True)
        if step < 2:
            for i, name in enumerate(EDITED):
                p, ref = params[name], ref_params[name]
                full = torch.randn(ref.shape, generator=torch.Generator().manual_seed(10 * step + i))
                if how == "grad":
                    p.grad, ref.grad = _shard(full, rank, strategy).clone(), full.clone()
                elif how == "grad.data":
                    p.grad.data, ref.grad.data = _shard(full, rank, strategy).clone(), full.clone()
                else:
                    p.grad, ref.grad = None, None
            _check_shards(model, ddp, rank, strategy, mode, f"edited grads {step}", grads=True)
            opt.step(), ref_opt.step()
            _check_shards(model, ddp, rank, strategy, mode, f"step on edited grads {step}")
    _assert_compiled(model, mode)


# ---- behaviour 8: summon_full_params -------------------------------------------------------------------
def summon(rank, strategy, mode):
    """``with_grads=True`` shows full gradients; ``writeback=False`` discards edits; the default
    (``writeback=True``) lands them in the shards, and the next step uses them."""
    model, run, ddp, _ = _shared(strategy, mode)
    x = _batch(0, rank)
    _loss(run(x)).backward()
    _loss(ddp(x)).backward()
    want = dict(ddp.module.named_parameters())
    with summon_full_params(model, with_grads=True):
        got = dict(model.named_parameters())
        assert list(got) == list(want)
        for name, ref in want.items():
            assert got[name].shape == ref.shape, name
            _close(got[name].detach(), ref.detach(), mode, f"summoned {name}")
            _close(got[name].grad, ref.grad, mode, f"summoned grad of {name}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with summon_full_params(model, writeback=False):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"writeback=False changed {name}"
    with summon_full_params(model):
        with torch.no_grad():
            model.blocks[0].lin1.weight.mul_(2.0)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.sub_(0.25)
    with torch.no_grad():
        ddp.module.blocks[0].lin1.weight.mul_(2.0)
        for name, p in ddp.module.named_parameters():
            if name.endswith("bias"):
                p.sub_(0.25)
    _check_shards(model, ddp, rank, strategy, mode, "after writeback", grads=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    opt.step(), ref_opt.step()
    opt.zero_grad(), ref_opt.zero_grad()
    x = _batch(1, rank)
    loss, ref_loss = _loss(run(x)), _loss(ddp(x))
    _close(loss.detach(), ref_loss.detach(), mode, "loss after writeback")
    loss.backward(), ref_loss.backward()
    _check_shards(model, ddp, rank, strategy, mode, "backward after writeback", grads=True)
    _assert_compiled(model, mode)


# ---- behaviour 9: no_sync ------------------------------------------------------------------------------
REDUCTIONS = {"reduce_scatter_tensor", REDUCE_SCATTER, "all_reduce", "reduce_scatter_tensor_coalesced", "all_reduce_coalesced"}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _count_collectives(model, run, x, mode) -> tuple[int, int]:
    """One forward + backward; returns (gradient reductions, all-gathers in the backward).
    Eager: calls of ``collectives.reduce_unit_grads`` / ``all_gather_unit`` (the backward's are
    the FULL_SHARD regathers). Compiled: the collectives in the schedules of the one compiled
    graph this call created (each gradient mode compiles its own graph)."""
    seen = len(fsdp_compile.sharding_info(model).compiled_graphs)
    with mock.patch.object(collectives, "reduce_unit_grads", wraps=collectives.reduce_unit_grads) as reduce:
        loss = _loss(run(x))
        with mock.patch.object(collectives, "all_gather_unit", wraps=collectives.all_gather_unit) as gather:
            loss.backward()
    if mode == "eager":
        return reduce.call_count, gather.call_count
    new = fsdp_compile.sharding_info(model).compiled_graphs[seen:]  # (the spies also saw AOTAutograd trace the graphs: not runs)
    assert len(new) == 1, f"expected one new compiled graph (a new gradient mode), got {len(new)}"
    schedules = new[0].schedules
    reductions = sum(c.kind in REDUCTIONS for name in ("forward", "backward") for c in schedules[name])
    return reductions, sum(c.kind.startswith("all_gather") for c in schedules["backward"])


def no_sync_case(rank, strategy, mode, param_dtype):
    """A backward inside ``no_sync`` then one outside == exactly 2x one synced backward; inside,
    no gradient reduction (and no collective beyond FULL_SHARD's backward regathers); with
    MixedPrecision(param_dtype, reduce_dtype=fp32) the gradients are fp32. Without mixed
    precision, also against DDP (one backward, and DDP's ``no_sync``)."""
    mp = None if param_dtype is None else MixedPrecision(getattr(torch, param_dtype), torch.float32)
    model, run, ddp, _ = _build(strategy, mode, mp=mp)
    n_units = len(fsdp_compile.sharding_info(model).units)
    x = _batch(0, rank)
    reductions, regathers = _count_collectives(model, run, x, mode)
    assert reductions == n_units and (regathers > 0) == (strategy == "FULL_SHARD"), (reductions, regathers)
    once = _grads(model)
    assert all(g.dtype == torch.float32 for g in once.values())
    for p in model.parameters():
        p.grad = None
    with no_sync(model):
        assert _count_collectives(model, run, x, mode) == (0, regathers)
    assert all(p.grad is None for p in model.parameters())  # held back until the synced backward
    assert _count_collectives(model, run, x, mode) == (n_units, regathers)
    for name, grad in _grads(model).items():
        assert grad.dtype == torch.float32, (name, grad.dtype)
        assert torch.equal(grad, 2 * once[name]), f"{name}: no_sync + synced != 2x synced"
    if mp is None:
        _loss(ddp(x)).backward()
        for name, ref in ddp.module.named_parameters():
            _close(once[name], _shard(ref.grad, rank, strategy), mode, f"one synced backward: grad of {name}")
        for p, ref in zip(model.parameters(), ddp.parameters()):
            p.grad, ref.grad = None, None
        with ddp.no_sync():
            _loss(ddp(x)).backward()
        _loss(ddp(x)).backward()
        with no_sync(model):
            _loss(run(x)).backward()
        _loss(run(x)).backward()
        _check_shards(model, ddp, rank, strategy, mode, "vs DDP no_sync", grads=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_compiled(model, mode)


# ---- behaviour 10: size-0 shards ------------------------------------------------------------------------
def empty_shards(rank, strategy, mode):
    """Parameters of dim 0 = 1: on rank 1 every shard is empty (FULL_SHARD, SHARD_GRAD_OP);
    foreach Adam, AdamW and SGD with momentum train it like DDP. Eagerly over 1,000 parameters;
    compiled over 20 (the optimizers run eagerly either way, and compile time grows with the
    number of parameters read per unit)."""
    n_linear = 500 if mode == "eager" else 10
    model, run, ddp, _ = _build(strategy, mode, lambda: ManyTiny(n_linear))
    params = list(model.parameters())
    assert len(params) == 2 * n_linear
    if strategy != "NO_SHARD":
        assert all(p.numel() == 0 for p in params) == (rank == 1)
    opts = [
        torch.optim.Adam(params[0::3], lr=1e-2, foreach=True),
        torch.optim.AdamW(params[1::3], lr=1e-2, foreach=True),
        torch.optim.SGD(params[2::3], lr=1e-2, momentum=0.9, foreach=True),
    ]
    ref_params = list(ddp.parameters())
    ref_opts = [
        torch.optim.Adam(ref_params[0::3], lr=1e-2, foreach=True),
        torch.optim.AdamW(ref_params[1::3], lr=1e-2, foreach=True),
        torch.optim.SGD(ref_params[2::3], lr=1e-2, momentum=0.9, foreach=True),
    ]
    for step in range(3):
        x = _batch(step, rank, d_in=4)
        loss, ref_loss = _loss(run(x)), _loss(ddp(x))
        loss.backward(), ref_loss.backward()
        _close(loss.detach(), ref_loss.detach(), mode, f"loss at step {step}")
        for o in (*opts, *ref_opts):
            o.step()
            o.zero_grad()
    _check_full_params(model, ddp, mode, "after 3 steps")
    _assert_compiled(model, mode)


# ---- behaviour 11: tied and shared parameters -------------------------------------------------------------
def tied(rank, strategy, mode):
    """``head.weight is emb.weight`` and ``blocks.1.lin1.weight is blocks.0.lin1.weight``: each is one
    shard under two names, in the root unit (common ancestor), and gets the sum of its uses'
    gradients as in DDP."""
    model, run, ddp, _ = _build(strategy, mode, TiedNet)
    where = fsdp_compile.sharding_info(model).param_units
    for a, b in (("head.weight", "emb.weight"), ("blocks.1.lin1.weight", "blocks.0.lin1.weight")):
        assert where[a] == where[b] and where[a][0] == "", a
    assert model.head.weight is model.emb.weight
    assert model.blocks[1].lin1.weight is model.blocks[0].lin1.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for step in range(3):
        idx = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(10 * step + rank))
        loss, ref_loss = _loss(run(idx)), _loss(ddp(idx))
        _backward_compare_step(loss, ref_loss, model, ddp, opt, ref_opt, rank, strategy, mode, step)
    _check_full_params(model, ddp, mode, "after 3 steps")
    _assert_compiled(model, mode)


# ---- the plan: behaviour -> (function, cases) ------------------------------------------------------
PLAN = {
    "param_groups": (param_groups, _grid()),
    "param_groups_inductor": (param_groups, [(s, "compiled", "inductor") for s in STRATEGIES]),
    "frozen": (frozen, _grid()),
    "several_optimizers": (several_optimizers, _grid()),
    "several_forwards": (several_forwards, _grid()),
    "param_access": (param_access, _grid()),
    "param_writeback": (param_writeback, _grid(("parameter", "data"))),
    "grad_writeback": (grad_writeback, _grid(("grad", "grad.data", "none"))),
    "summon_full_params": (summon, _grid()),
    # Mixed precision: every dtype eagerly; compiled, one dtype per strategy (compiling is the cost).
    "no_sync": (
        no_sync_case,
        [case for case in _grid((None, "float16", "bfloat16"))
         if case[1] == "eager" or case[2] in (None, {"FULL_SHARD": "float16", "SHARD_GRAD_OP": "bfloat16", "NO_SHARD": "float16"}[case[0]])],
    ),
    "empty_shards": (empty_shards, _grid()),
    "tied_and_shared": (tied, _grid()),
}


def _in_default_run(behaviour: str, case: tuple) -> bool:
    """Eager cases of every strategy and compiled (aot_eager) FULL_SHARD ones run in the default
    suite; the other strategies' compiled cases and Inductor's under the slow marker
    (``test_behaviour_slow_cases``; test_compiled.py compiles SHARD_GRAD_OP and NO_SHARD in the
    default suite, and FULL_SHARD with Inductor, training parameter groups). Compiled no_sync
    runs with float16 compute by default; without mixed precision (graphs without the casts;
    tests/test_hybrid_shard.py compiles no_sync micro-batches in full precision) it is slow."""
    if "inductor" in case:
        return False
    if behaviour == "no_sync" and case[1] == "compiled" and case[2] is None:
        return False
    return case[1] == "eager" or case[0] == "FULL_SHARD"


def _cases(behaviour: str, default_run: bool) -> list[tuple]:
    return [case for case in PLAN[behaviour][1] if _in_default_run(behaviour, case) == default_run]


def _run_plan(rank: int, world: int, selected: dict[str, list[tuple]]) -> dict:
    """Every case in ``selected`` (behaviour -> cases) on this rank: ``{(behaviour, case): None |
    traceback}``. The cases run strategy by strategy (behaviours in plan order within each), so
    the ``_shared`` models of a strategy stay compiled through it; Dynamo is reset between
    strategies."""
    # A strategy compiles Net.forward for a few models (shared, frozen, built-before, no_sync's):
    # above Dynamo's default of 8 entries per code object, a model would silently run eagerly.
    torch._dynamo.config.recompile_limit = 32
    results = {}
    for strategy in STRATEGIES:
        torch._dynamo.reset()
        _SHARED.clear()
        for behaviour, cases in selected.items():
            fn = PLAN[behaviour][0]
            for case in cases:
                if case[0] != strategy:
                    continue
                print(f"[rank {rank}] {behaviour} {case}", file=sys.stderr, flush=True)
                try:
                    fn(rank, *case)
                    results[behaviour, case] = None
                except Exception:  # noqa: BLE001 -- every failing case is reported by the parent
                    results[behaviour, case] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def results(request) -> list[dict]:
    """One spawn of 2 gloo ranks runs the cases of every selected test (startup and the first
    compile are paid once); each test then checks its own cases."""
    selected = {}
    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec"):
            behaviour = item.callspec.params["behaviour"]
            in_default_run = item.get_closest_marker("slow") is None  # test_behaviour, not its slow twin
            selected.setdefault(behaviour, []).extend(_cases(behaviour, in_default_run))
    selected = {b: selected[b] for b in PLAN if b in selected}
    return run_ranks(_run_plan, WORLD, selected, timeout=850.0)


def _assert_cases_passed(results: list[dict], behaviour: str, cases: list[tuple]) -> None:
    failures, summary = [], []
    for rank, per_rank in enumerate(results):
        for case in cases:
            error = per_rank.get((behaviour, case), "did not run")
            if error is not None:
                summary.append(f"{case} rank {rank}: {error.strip().splitlines()[-1][:200]}")
                failures.append(f"--- {case} rank {rank}:\n{error}")
    assert cases, f"{behaviour}: no cases"
    assert not failures, f"{behaviour}: failing cases:\n" + "\n".join(summary) + "\n\n" + "\n".join(failures)


def _params(behaviours) -> list:
    return [pytest.param(b, marks=pytest.mark.inductor) if "_inductor" in b else b for b in behaviours]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("behaviour", _params(b for b in PLAN if _cases(b, default_run=True)))
def test_behaviour(behaviour, results):
    _assert_cases_passed(results, behaviour, _cases(behaviour, default_run=True))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("behaviour", _params(b for b in PLAN if _cases(b, default_run=False)))
def test_behaviour_slow_cases(behaviour, results):
    """The compiled cases of ``behaviour`` outside the default run: SHARD_GRAD_OP and NO_SHARD
    with aot_eager, every strategy with Inductor, and no_sync without mixed precision."""
    _assert_cases_passed(results, behaviour, _cases(behaviour, default_run=False))
