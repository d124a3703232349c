"""Cases where a sharded model used to train silently wrong, or broke ordinary usage, each
against an independent reference, eagerly and compiled (``aot_eager``) where both apply:

1. a parameter that takes no part in the loss keeps ``.grad`` None (DDP with
   ``find_unused_parameters=True``, a plain model), so AdamW trains like DDP;
2. ranks that initialize differently: ``fully_shard`` raises naming the first differing
   parameter or buffer, and ``sync_module_states=True`` starts every rank from rank 0's values
   (DDP, which broadcasts rank 0's at construction), also for meta-device init and on a hybrid
   2 x 2 mesh;
3. ``clip_grad_norm_`` in float64 equals DDP with ``torch.nn.utils.clip_grad_norm_`` to
   rounding, over 30 steps (300 under the slow marker);
4. FSDP1's ``param_init_fn`` (``to_empty(recurse=False)`` then ``reset_parameters()``) gives
   the plain model's parameters (single process);
5. a partial ``set_model_state_dict`` (full tensors or DTensors, ``strict=False``) loads those
   keys and leaves the others untouched (a plain model's ``load_state_dict(strict=False)``).

One spawn of 2 gloo ranks runs the 2-rank cases (``run_case`` per case); the assertions run
here. The numbers are float64; "to rounding" is ``rtol=1e-12``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.reference import reference_shard
from fsdp_compile.testing.spawn import case_result, error_text, run_case, run_ranks

EXACT = dict(rtol=1e-12, atol=1e-12)
AOT_EAGER = fsdp_compile.backend(inner="aot_eager")


class Block(nn.Module):
    """A unit whose ``side`` layer runs but whose output is discarded unless ``use_side``."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.side = nn.Linear(d, d)
        self.use_side = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x)
        y = torch.tanh(self.fc(x))
        return y + side if self.use_side else y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))


def _seeded(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)


def _train(forward, model, rank, steps, clip=None, opt_cls=torch.optim.AdamW):
    """``steps`` AdamW steps; returns the losses, the clip norms and the first step's grad-is-None
    pattern of ``model``'s parameters."""
    opt = opt_cls(model.parameters(), lr=1e-2)
    losses, norms, none = [], [], None
    for step in range(steps):
        loss = forward(_batch(step, rank)).square().mean()
        loss.backward()
        if none is None:
            none = {n: p.grad is None for n, p in model.named_parameters()}
        if clip is not None:
            norms.append(float(clip()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "none": none}


def _params(module: nn.Module) -> dict:
    """Copies of the parameters (not buffers: DDP broadcasts rank 0's BatchNorm statistics at
    every forward, a sharded model keeps each rank's, as FSDP does)."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _sharded(base, **kwargs):
    return fully_shard(copy.deepcopy(base), policy={Block}, **kwargs)


def _forward(model, mode):
    return model if mode == "eager" else torch.compile(model, backend=AOT_EAGER)


_COMPILED: dict = {}  # this rank's compiled ``_sharded(_seeded())``, see ``_compiled_seeded``


def _compiled_seeded(base):
    """``_sharded(base)`` compiled, for the compiled runs that start from ``_seeded()`` (cases 1
    and 3): built and compiled once per rank, then reset to ``base``'s parameters and buffers
    with every ``.grad`` None. Compiling is what costs time; the cases need no Dynamo reset
    between models (each model's graphs guard on its own units)."""
    if not _COMPILED:
        model = _sharded(base)
        _COMPILED["model"] = model, torch.compile(model, backend=AOT_EAGER)
    model, run = _COMPILED["model"]
    fsdp_compile.load_full_state_dict(model, base.state_dict())
    for p in model.parameters():
        p.grad = None
    return model, run


# ---- 1. unused parameters ----------------------------------------------------------------
def unused_parameters(rank, world):
    base = _seeded()
    ddp = DDP(copy.deepcopy(base), find_unused_parameters=True)
    out = {"ddp": {**_train(ddp, ddp.module, rank, 5), "params": _params(ddp.module)}}
    plain = copy.deepcopy(base)
    plain(_batch(0, rank)).sum().backward()
    out["plain_none"] = {n: p.grad is None for n, p in plain.named_parameters()}
    for mode in ("eager", "compiled"):
        model, run = (_sharded(base),) * 2 if mode == "eager" else _compiled_seeded(base)
        out[mode] = {**_train(run, model, rank, 5), "params": fsdp_compile.full_state_dict(model)}
    # Used on rank 1 only: eagerly, rank 0's rows still get rank 1's gradient (DDP: the average)
    diverging = copy.deepcopy(base)
    diverging.blocks[0].use_side = rank == 1
    ddp = DDP(copy.deepcopy(diverging), find_unused_parameters=True)
    out["ddp_diverging"] = {**_train(ddp, ddp.module, rank, 3), "params": _params(ddp.module)}
    model = _sharded(diverging)
    out["eager_diverging"] = {**_train(model, model, rank, 3), "params": fsdp_compile.full_state_dict(model)}
    # Compiled, whether a gradient exists is part of the graph: ranks that disagree fail at once
    model = _sharded(diverging)
    compiled = torch.compile(model, backend=AOT_EAGER)
    out["compiled_diverging"] = error_text(lambda: compiled(_batch(0, rank)).sum().backward())
    return out


# ---- 2. ranks that initialize differently -------------------------------------------------
def _fsdp1_init(module: nn.Module) -> None:
    module.to_empty(device="cpu", recurse=False)
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def _meta_net(seed: int) -> Net:
    torch.manual_seed(seed)
    with torch.device("meta"):
        net = Net()
    return net


def different_inits(rank, world):
    out = {}
    out["params_differ"] = error_text(lambda: _sharded(_seeded(rank)))
    same = _seeded()
    with torch.no_grad():
        same.norm.running_mean.add_(rank)
    out["buffer_differs"] = error_text(lambda: _sharded(same))
    out["meta_differs"] = error_text(lambda: fully_shard(_meta_net(rank), policy={Block}, param_init_fn=_fsdp1_init))
    out["unchecked"] = error_text(lambda: _sharded(_seeded(rank), check_ranks=False))
    # sync_module_states: rank 0's values everywhere, then training equals DDP (which also
    # broadcasts rank 0's parameters and buffers when it is built)
    mine = _seeded(rank)
    with torch.no_grad():
        mine.norm.running_mean.add_(rank)
    ddp = DDP(copy.deepcopy(mine), find_unused_parameters=True)
    out["ddp"] = {**_train(ddp, ddp.module, rank, 3), "state": _params(ddp.module)}
    for mode in ("eager", "compiled"):
        model = _sharded(mine, sync_module_states=True)
        out[f"{mode}_start"] = {k: v.clone() for k, v in fsdp_compile.full_state_dict(model).items()}
        out[mode] = {**_train(_forward(model, mode), model, rank, 3), "state": fsdp_compile.full_state_dict(model)}
    meta = fully_shard(_meta_net(rank), policy={Block}, param_init_fn=_fsdp1_init, sync_module_states=True)
    out["meta_synced"] = fsdp_compile.full_state_dict(meta)
    return out


def hybrid_different_inits(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    differ = error_text(lambda: _sharded(_seeded(rank), device_mesh=mesh))
    model = _sharded(_seeded(rank), device_mesh=mesh, sync_module_states=True)
    return {"differ": differ, "synced": fsdp_compile.full_state_dict(model)}


# ---- 3. clip_grad_norm_ in float64 ---------------------------------------------------------
# Steps of the clipping run in the default suite; the slow run trains LONG_CLIP_STEPS.
CLIP_STEPS, LONG_CLIP_STEPS = 30, 300


def clipping(rank, world, steps):
    base = _seeded()
    ddp = DDP(copy.deepcopy(base), find_unused_parameters=True)
    clip = lambda: torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.05)  # noqa: E731
    out = {"ddp": {**_train(ddp, ddp.module, rank, steps, clip), "params": _params(ddp.module)}}
    for mode in ("eager", "compiled"):
        model, forward = (_sharded(base),) * 2 if mode == "eager" else _compiled_seeded(base)
        run = _train(forward, model, rank, steps, lambda: fsdp_compile.clip_grad_norm_(model, 0.05))
        out[mode] = {**run, "params": fsdp_compile.full_state_dict(model)}
    return out


# ---- 5. partial state-dict loads -----------------------------------------------------------
def partial_loads(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    base, other = _seeded(0), _seeded(1)
    keys = ["blocks.1.fc.weight", "head.bias", "norm.running_var"]
    plain = copy.deepcopy(base)
    plain.load_state_dict({k: other.state_dict()[k] for k in keys}, strict=False)
    out = {"reference": plain.state_dict()}
    full = StateDictOptions(full_state_dict=True, strict=False)
    for mode in ("eager", "compiled"):
        model = _sharded(base)
        target = _forward(model, mode)  # torch's helpers take the compiled wrapper too
        set_model_state_dict(target, {k: other.state_dict()[k].clone() for k in keys}, options=full)
        out[f"full_{mode}"] = fsdp_compile.full_state_dict(model)
    source = _sharded(other)
    model = _sharded(base)
    set_model_state_dict(
        model, {k: source.state_dict()[k] for k in keys}, options=StateDictOptions(strict=False)
    )
    out["dtensor"] = fsdp_compile.full_state_dict(model)
    model = _sharded(base)
    model.load_state_dict({k: source.state_dict()[k] for k in keys}, strict=False)
    out["dtensor_load_state_dict"] = fsdp_compile.full_state_dict(model)
    return out


def world2_cases(rank, world):
    cases = {
        "unused": unused_parameters, "inits": different_inits, "partial": partial_loads,
        "clip": lambda r, w: clipping(r, w, CLIP_STEPS),
    }
    return {name: run_case(lambda fn=fn: fn(rank, world)) for name, fn in cases.items()}


@pytest.fixture(scope="module")
def world2():
    return run_ranks(world2_cases, 2, timeout=600)


def _results(world2, case):
    return [case_result(per_rank[case]) for per_rank in world2]


def test_unused_parameters_keep_grad_none_and_adamw_matches_ddp(world2):
    for out in _results(world2, "unused"):
        want = out["ddp"]["none"]
        assert want == out["plain_none"]
        assert want["blocks.0.side.weight"] and want["blocks.1.side.bias"] and not want["head.weight"]
        for mode in ("eager", "compiled"):
            assert out[mode]["none"] == want, mode
            assert_close(out[mode]["losses"], out["ddp"]["losses"], **EXACT)
            for name, value in out["ddp"]["params"].items():
                assert_close(out[mode]["params"][name], value, **EXACT, msg=f"{mode} {name}")


def test_a_parameter_used_on_one_rank_only(world2):
    for out in _results(world2, "unused"):
        # eagerly: every rank gets the other's gradient, as DDP's average
        assert out["eager_diverging"]["none"] == out["ddp_diverging"]["none"]
        for name, value in out["ddp_diverging"]["params"].items():
            assert_close(out["eager_diverging"]["params"][name], value, **EXACT, msg=name)
        # compiled: a clear error at the first call, naming the parameters without a gradient
        message = out["compiled_diverging"]
        assert "forward+backward (joint)" in message and "got no gradient" in message, message
        assert "[2, 3] here, [] there" in message or "[] here, [2, 3] there" in message, message


def test_ranks_that_initialize_differently_fail_at_fully_shard(world2):
    for out in _results(world2, "inits"):
        for key, name in (("params_differ", "parameter 'blocks.0.fc.weight'"),
                          ("buffer_differs", "buffer 'norm.running_mean'"),
                          ("meta_differs", "parameter 'blocks.0.fc.weight'")):
            message = out[key]
            assert name in message and "different values on different ranks" in message, message
            assert "sync_module_states=True" in message and "manual_seed" in message, message
        assert out["unchecked"] == "no error"


def test_sync_module_states_starts_every_rank_from_rank_0(world2):
    reference = _seeded(0).state_dict()  # rank 0's model; its running_mean + 0
    results = _results(world2, "inits")
    for out in results:
        for key in ("eager_start", "compiled_start"):
            for name, value in reference.items():
                assert torch.equal(out[key][name], value), (key, name)
        for mode in ("eager", "compiled"):
            assert_close(out[mode]["losses"], out["ddp"]["losses"], **EXACT)
            for name, value in out["ddp"]["state"].items():
                assert_close(out[mode]["state"][name], value, **EXACT, msg=f"{mode} {name}")
        torch.manual_seed(0)
        plain = Net()  # the meta model, initialized the same way on the CPU with rank 0's seed
        for name, value in plain.state_dict().items():
            assert torch.equal(out["meta_synced"][name], value), name
    assert not torch.equal(results[0]["ddp"]["state"]["head.weight"], _seeded(1).state_dict()["head.weight"])


def _assert_clipping_equals_ddp(results: list[dict], steps: int) -> None:
    for out in results:
        assert len(out["ddp"]["norms"]) == steps and max(out["ddp"]["norms"]) > 0.05  # it clips
        for mode in ("eager", "compiled"):
            assert_close(out[mode]["norms"], out["ddp"]["norms"], **EXACT)
            assert_close(out[mode]["losses"], out["ddp"]["losses"], **EXACT)
            for name, value in out["ddp"]["params"].items():
                assert_close(out[mode]["params"][name], value, **EXACT, msg=f"{mode} {name}")


def test_clip_grad_norm_float64_equals_ddp(world2):
    _assert_clipping_equals_ddp(_results(world2, "clip"), CLIP_STEPS)


@pytest.mark.slow  # ~20 s: a spawn of its own
def test_clip_grad_norm_float64_equals_ddp_over_300_steps():
    _assert_clipping_equals_ddp(run_ranks(clipping, 2, LONG_CLIP_STEPS, timeout=600), LONG_CLIP_STEPS)


def test_partial_state_dict_loads_leave_other_parameters_untouched(world2):
    for out in _results(world2, "partial"):
        for key in ("full_eager", "full_compiled", "dtensor", "dtensor_load_state_dict"):
            for name, value in out["reference"].items():
                assert torch.equal(out[key][name], value), (key, name)


def test_hybrid_mesh_checks_and_syncs_initial_values():
    for out in run_ranks(hybrid_different_inits, 4, timeout=300):
        assert "parameter 'blocks.0.fc.weight'" in out["differ"] and "sync_module_states" in out["differ"]
        for name, value in _seeded(0).state_dict().items():
            assert torch.equal(out["synced"][name], value), name


# ---- 4. FSDP1-style param_init_fn (single process) -----------------------------------------
def test_fsdp1_style_param_init_fn_gives_the_plain_models_parameters():
    torch.manual_seed(0)
    plain = Net()
    model = fully_shard(_meta_net(0), policy={Block}, param_init_fn=_fsdp1_init)
    for name, value in plain.state_dict().items():
        assert torch.equal(fsdp_compile.full_state_dict(model)[name], value), name
    assert torch.equal(dict(model.named_parameters())["head.weight"], reference_shard(plain.head.weight, 1, 0))


def test_param_init_fn_errors_say_what_ran():
    def only_to_empty(module):
        module.to_empty(device="cpu", recurse=False)

    with pytest.raises(RuntimeError) as info:
        fully_shard(_meta_net(0), param_init_fn=only_to_empty)
    message = str(info.value)
    assert "'blocks.0.fc.weight'" in message and "param_init_fn 'only_to_empty' ran on this Linear" in message
    assert "no param_init_fn was given" not in message

    with pytest.raises(ValueError, match=r"to_empty\(device=meta\).*materializes this model on cpu"):
        fully_shard(_meta_net(0), param_init_fn=lambda m: m.to_empty(device="meta", recurse=False))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        bare = nn.Sequential(Scaled())
    with pytest.raises(RuntimeError, match="Scaled has no reset_parameters\\(\\) and no param_init_fn was given"):
        fully_shard(bare)
    with torch.device("meta"):
        linear = nn.Sequential(nn.Linear(2, 2))
    linear[0].reset_parameters = lambda: None  # found by hasattr, writes nothing
    with pytest.raises(RuntimeError, match=r"Linear.reset_parameters\(\) ran and left it alone"):
        fully_shard(linear)
