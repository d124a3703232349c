"""Eager FSDP: parity with DDP, empty shards, memory, world size 1, errors, gradients.

No ``torch.compile`` here. Multi-rank tests run real 2-rank gloo groups
(``fsdp_compile.testing.spawn.run_ranks``); to keep the suite fast, one spawn runs every case of
a test (or of a group of tests, through a module-scoped fixture) and returns plain data; the
parent asserts. Independent references: ``DistributedDataParallel`` over a deepcopy of the same
seeded model fed the same per-rank data (shards are compared with the reference's dim-0 rows,
``ceil(D / world)`` per rank, cut here), a plain unsharded model (world size 1), and byte counts
computed here from the parameters' full shapes.
"""
from __future__ import annotations

import copy
import datetime
import math
import time
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import collectives, fully_shard, sharding_info
from fsdp_compile.testing.gpt import GPT, Block, GPTConfig, gpt_batch
from fsdp_compile.testing.gpt import param_groups as _param_groups
from fsdp_compile.testing.loop import optimizer_step
from fsdp_compile.testing.reference import manual_mixed_precision
from fsdp_compile.testing.spawn import run_ranks

WORLD = 2
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
# Odd sizes (vocab 97, seq 31): shards of tok_emb / pos_emb are padded on rank 1.
ODD = GPTConfig(vocab=97, seq=31, layers=2)


# ---- helpers (run inside the ranks) ----------------------------------------------------------
def _init_rank() -> None:
    torch.set_num_threads(1)  # two ranks share two cores


def _rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The reference shard: rows [r*c, min((r+1)*c, D)) of dim 0, c = ceil(D / world)."""
    d = full.shape[0]
    c = math.ceil(d / world)
    return full[min(rank * c, d): min((rank + 1) * c, d)]


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    with fsdp_compile.summon_full_params(model, writeback=False):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _plain_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ddp_rows(ddp_module: nn.Module, what: str, rank: int, world: int, replicated: bool):
    """name -> this rank's rows of the reference's parameter (``what='data'``) or grad."""
    out = {}
    for n, p in ddp_module.named_parameters():
        t = p.detach() if what == "data" else p.grad
        if t is None:
            out[n] = None
        else:
            if t.ndim == 0:  # a 0-d parameter is held whole by every rank
                out[n] = t.reshape(1).clone()
                continue
            out[n] = t.clone() if replicated else _rows(t, rank, world).clone()
    return out


def _shard_grads(model: nn.Module):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _seeded(cls=GPT, *args, seed: int = 0):
    torch.manual_seed(seed)
    return cls(*args)


def _cases(fns: dict) -> dict:
    """Run every case; a failing case returns its traceback instead of stopping the others."""
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 -- reported to the parent
            out[name] = {"error": traceback.format_exc()}
    return out


def _ok(result):
    if isinstance(result, dict) and "error" in result:
        pytest.fail(result["error"])
    return result


def _assert_same(got: dict, want: dict, what: str):
    assert set(got) == set(want), what
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{what}: {name} should be None"
        else:
            assert got[name] is not None, f"{what}: {name} is None"
            assert_close(got[name], want[name], msg=lambda m: f"{what}: {name}: {m}")


def _train_adamw(model, forward, rank, steps, foreach=None):
    """``steps`` AdamW steps over the GPT's three parameter groups -> (losses, optimizer)."""
    opt = torch.optim.AdamW(_param_groups(model), foreach=foreach)
    losses = [optimizer_step(forward, opt, *gpt_batch(step, rank)) for step in range(steps)]
    return torch.stack(losses), opt


# ---- 1. parity with DDP: GPT (tied head), 3 parameter groups, 10 AdamW steps ------------------
def _parity_rank(rank, world, steps):
    _init_rank()

    def train(model, forward, foreach):
        losses, opt = _train_adamw(model, forward, rank, steps, foreach)
        return losses, [len(g["params"]) for g in opt.param_groups]

    out = {}
    for foreach in (True, False):
        ddp = DDP(_seeded())
        losses, sizes = train(ddp.module, ddp, foreach)
        out[("DDP", foreach)] = (losses, sizes, _plain_params(ddp.module))
        for strategy in STRATEGIES:
            model = fully_shard(_seeded(), policy={Block}, strategy=strategy)
            losses, sizes = train(model, model, foreach)
            out[(strategy, foreach)] = (losses, sizes, _full_params(model))
    return out


def test_ddp_parity_adamw_param_groups():
    per_rank = run_ranks(_parity_rank, WORLD, 10, timeout=240)
    for rank, out in enumerate(per_rank):
        for foreach in (True, False):
            ref_losses, ref_sizes, ref_params = out[("DDP", foreach)]
            # weights: tied tok_emb + 8 x (qkv, proj, fc1, fc2); biases: 8 x 6 + ln_f.bias;
            # rest: pos_emb + LayerNorm weights (8 x 2 + ln_f.weight).
            assert ref_sizes == [33, 49, 18]
            for strategy in STRATEGIES:
                losses, sizes, params = out[(strategy, foreach)]
                what = f"rank {rank} {strategy} foreach={foreach}"
                assert sizes == ref_sizes, what
                assert_close(losses, ref_losses, msg=lambda m: f"{what} losses: {m}")
                _assert_same(params, ref_params, what)
        # Different data per rank: the losses differ between ranks.
        assert not torch.equal(per_rank[0][("DDP", True)][0], per_rank[1][("DDP", True)][0])


# ---- 1b. mixed precision against a hand-written bf16 reference --------------------------------
BF16 = fsdp_compile.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _mixed_precision_rank(rank, world, steps):
    _init_rank()
    out = {"reference": manual_mixed_precision(_seeded(), _param_groups, lambda step: [gpt_batch(step, rank)], steps)}
    out["fp32_first_loss"] = _seeded()(*gpt_batch(0, rank)).detach()
    for strategy in STRATEGIES:
        model = fully_shard(_seeded(), policy={Block}, strategy=strategy, mixed_precision=BF16)
        losses, _ = _train_adamw(model, model, rank, steps)
        out[strategy] = (losses, _full_params(model))
    return out


def test_mixed_precision_matches_a_hand_written_bf16_reference():
    for rank, out in enumerate(run_ranks(_mixed_precision_rank, WORLD, 10, timeout=240)):
        ref_losses, ref_params = out["reference"]
        assert ref_losses[0] != out["fp32_first_loss"]  # the reference does compute in bf16
        for strategy in STRATEGIES:
            losses, params = out[strategy]
            what = f"rank {rank} {strategy} bf16"
            assert_close(losses, ref_losses, rtol=0, atol=0, msg=lambda m: f"{what} losses: {m}")
            assert all(p.dtype == torch.float32 for p in params.values()), what
            for name, value in ref_params.items():
                assert_close(params[name], value, rtol=0, atol=0, msg=lambda m: f"{what}: {name}: {m}")


# ---- 2. empty shards on rank 1, foreach optimizers ---------------------------------------------
class Tiny(nn.Module):
    """fc1 is split; head (a (1, 16) weight, a (1,) bias) and ``scale`` (1,) are empty on rank
    1; the 0-d ``temp`` is held whole (one element) by every rank. Under ``policy={nn.Linear}``
    the ``head`` unit holds nothing but padding on rank 1."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)
        self.scale = nn.Parameter(torch.full((1,), 1.5))
        self.temp = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x) * self.temp)) * self.scale


def _tiny_batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 1, generator=g)


def _empty_shards_rank(rank, world):
    _init_rank()
    optimizers = {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
    }

    def train(model, forward, make_opt):
        opt = make_opt(model.parameters())
        losses = []
        for step in range(5):
            x, y = _tiny_batch(step, rank)
            loss = F.mse_loss(forward(x), y)
            loss.backward()
            grads_ok = all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), grads_ok

    out = {}
    for opt_name, make_opt in optimizers.items():
        ddp = DDP(_seeded(Tiny))
        out[("DDP", opt_name)] = (*train(ddp.module, ddp, make_opt), _plain_params(ddp.module), None)
        for strategy in STRATEGIES:
            for policy in (None, {nn.Linear}):
                model = fully_shard(_seeded(Tiny), policy=policy, strategy=strategy)
                shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
                losses, grads_ok = train(model, model, make_opt)
                key = (strategy, policy is None, opt_name)
                out[key] = (losses, grads_ok, _full_params(model), shapes)
    return out


def test_empty_shards_foreach_optimizers():
    per_rank = run_ranks(_empty_shards_rank, WORLD, timeout=120)
    full = {"fc1.weight": (16, 8), "fc1.bias": (16,), "head.weight": (1, 16), "head.bias": (1,), "scale": (1,)}
    for rank, out in enumerate(per_rank):
        for key, (losses, grads_ok, params, shapes) in out.items():
            if key[0] == "DDP":
                continue
            strategy, _, opt_name = key
            ref_losses, ref_ok, ref_params, _ = out[("DDP", opt_name)]
            what = f"rank {rank} {key}"
            temp_shape = shapes.pop("temp")
            if strategy == "NO_SHARD":
                assert shapes == full, what
            else:
                assert temp_shape == (1,), what
                assert shapes == {
                    "fc1.weight": (8, 8), "fc1.bias": (8,),
                    "head.weight": (1 - rank, 16), "head.bias": (1 - rank,), "scale": (1 - rank,),
                }, what
            assert grads_ok and ref_ok, what
            assert_close(losses, ref_losses, msg=lambda m: f"{what} losses: {m}")
            _assert_same(params, ref_params, what)


# ---- 3. world size 1: exactly a plain model ------------------------------------------------------
def _world_one(steps=3) -> dict:
    out = {}
    for strategy in STRATEGIES:
        plain = _seeded(GPT, ODD)
        model = fully_shard(copy.deepcopy(plain), policy={Block}, strategy=strategy)
        result = {}
        for name, m in (("plain", plain), ("sharded", model)):
            opt = torch.optim.AdamW(_param_groups(m))
            losses = []
            for step in range(steps):
                loss = m(*gpt_batch(step, 0, ODD))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            params = _full_params(m) if m is model else _plain_params(m)
            result[name] = (torch.stack(losses), params)
        out[strategy] = result
    return out


def _world_one_rank(rank, world):
    _init_rank()
    assert dist.is_initialized() and dist.get_world_size() == 1
    return _world_one()


def _assert_world_one(out, where):
    for strategy, result in out.items():
        (want_losses, want), (losses, got) = result["plain"], result["sharded"]
        assert torch.equal(losses, want_losses), f"{where} {strategy}: {losses} vs {want_losses}"
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"{where} {strategy}: {name}"


def test_world_size_one_spawned():
    (out,) = run_ranks(_world_one_rank, 1, timeout=120)
    _assert_world_one(out, "world 1 (gloo)")


def test_world_size_one_without_process_group():
    assert not dist.is_initialized()
    _assert_world_one(_world_one(), "no process group")


def _optimizer_hook_lifetime_rank(rank, world):
    """How many of our global optimizer step pre-hooks torch holds: before any model, with two
    sharded models, after deleting one and then the other (each followed by ``gc.collect``),
    and whether an optimizer stepped meanwhile got its state-dict hooks (DTensor state)."""
    import gc

    from torch.distributed.tensor import DTensor
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    from fsdp_compile.state_dict import _on_step

    def ours() -> int:
        return sum(1 for hook in _global_optimizer_pre_hooks.values() if hook is _on_step)

    _init_rank()
    gc.collect()
    out = {"before": ours()}
    first, second = (fully_shard(_seeded(GPT, ODD), policy={Block}) for _ in range(2))
    out["two models"] = ours()
    opt = torch.optim.AdamW(first.parameters())
    first(*gpt_batch(0, rank, ODD)).backward()
    opt.step()
    out["dtensor state"] = isinstance(opt.state_dict()["state"][0]["exp_avg"], DTensor)
    del first, opt
    gc.collect()
    out["one model"] = ours()
    del second
    gc.collect()
    out["no model"] = ours()
    return out


def test_the_global_optimizer_hook_lives_exactly_while_a_sharded_model_does():
    """``fully_shard`` registers one process-wide optimizer step pre-hook (state_dict.py's
    ``OptimizerHooks``, held by every ``FSDPState``): one for any number of models, there while
    one is alive, removed once the last one is freed. In fresh rank processes (2 ranks, so
    optimizer state of a shard is a DTensor)."""
    for out in run_ranks(_optimizer_hook_lifetime_rank, 2, timeout=120):
        assert out == {"before": 0, "two models": 1, "dtensor state": True, "one model": 1, "no model": 0}, out


def test_unit_runtime_transitions_are_checked_and_sharding_info_reports_them():
    """A unit's runtime record (``UnitRuntime``, owned by the model's ``FSDPState``) refuses an
    illegal change with an internal error naming the unit and what it holds; during a forward
    ``sharding_info`` lists the gathered units, afterwards none (in process, world size 1)."""
    from fsdp_compile.unit_runtime import Gathered, UnitStateError

    model = fully_shard(_seeded(GPT, ODD), policy={Block})
    state = fsdp_compile.api.root_state(model)
    rt = state.runtime[state.units[1].id]
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda *_: seen.setdefault("before", sharding_info(model).gathered) and None)
    model.blocks[0].fc2.register_forward_hook(lambda *_: seen.setdefault("inside", sharding_info(model).gathered) and None)
    model(*gpt_batch(0, 0, ODD)).backward()
    assert seen == {"before": ("",), "inside": ("", "blocks.0")} and sharding_info(model).gathered == ()
    assert rt.held == () and "SHARDED" in repr(rt)
    fulls = rt.regathered_for_backward()
    assert rt.held == (Gathered.BACKWARD,) and rt.regathered_for_backward() is fulls
    rt.gathered_for_recompute(fulls)
    with pytest.raises(UnitStateError, match=r"unit 'blocks.0' cannot be gathered for a recompute again while it is regathered for backward, gathered for a recompute"):
        rt.gathered_for_recompute(fulls)
    rt.after_backward_use()
    rt.gathered_for_forward(fulls)
    with pytest.raises(UnitStateError, match="internal error"):
        rt.gathered_for_forward(fulls)
    assert rt.resharded() and not rt.resharded() and rt.held == ()


# ---- 4. errors (in process: no process group needed) ----------------------------------------------
def test_error_sharding_twice():
    model = fully_shard(GPT(ODD), policy={Block})
    with pytest.raises(ValueError, match=r"module (Sharded)?GPT is already sharded by an earlier fully_shard"):
        fully_shard(model)
    with pytest.raises(ValueError, match=r"already sharded"):
        fully_shard(model.blocks[0])


def test_outer_fully_shard_adopts_a_submodule_sharded_by_an_earlier_call():
    """``fully_shard(outer)`` over a submodule an earlier call sharded keeps that submodule's
    unit (its own options: here a gradient divide factor) in the outer tree, under its full
    names, and trains like the plain model."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    model = copy.deepcopy(plain)
    fully_shard(model[2], gradient_divide_factor=2.0)
    fully_shard(model)
    assert [u.name for u in fsdp_compile.api.root_state(model).units] == ["", "2"]
    assert fsdp_compile.api.root_state(model).units[1].fqns == ["2.0.weight", "2.0.bias", "2.1.weight", "2.1.bias"]
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    for (name, got), want in zip(model.named_parameters(), plain.parameters()):
        scale = 0.5 if name.startswith("2.") else 1.0  # the adopted unit's divide factor
        assert_close(got.grad, want.grad * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "policy, match",
    [
        (3, r"policy must be None, a set of nn.Module classes, or a callable .*got int 3"),
        ({"Block"}, r"policy holds 'Block', which is not an nn.Module class"),
        ([Block, nn.Linear(2, 2)], r"policy holds Linear\(.*\), which is not an nn.Module class"),
        ("Block", r"policy must be None, a set of nn.Module classes, or a callable .*got str 'Block'"),
    ],
)
def test_error_policy_type(policy, match):
    model = GPT(ODD)
    with pytest.raises(TypeError, match=match):
        fully_shard(model, policy=policy)
    # Nothing was sharded: the model can still be sharded correctly.
    fully_shard(model, policy={Block})


def test_error_parameter_on_other_device():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(torch.empty(2, 4, device="meta"))
    with pytest.raises(ValueError, match=r"parameter '1\.weight' is on meta, but '0\.weight' is on cpu"):
        fully_shard(model)


# ---- 5. errors on 2 ranks: mismatched models, a wrong-shaped .data --------------------------------
def _errors_rank(rank, world):
    _init_rank()

    def mismatched_layers():
        cfg = ODD if rank == 0 else GPTConfig(vocab=97, seq=31, layers=3)
        try:
            fully_shard(GPT(cfg), policy={Block})
        except RuntimeError as e:
            return str(e)
        return None

    def mismatched_strategy():
        try:
            fully_shard(GPT(ODD), policy={Block}, strategy=STRATEGIES[rank])
        except RuntimeError as e:
            return str(e)
        return None

    def wrong_shape_data():
        ref = DDP(_seeded(GPT, ODD))
        model = fully_shard(_seeded(GPT, ODD), policy={Block})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        param = model.blocks[1].fc1.weight
        kept = param.data
        param.data = torch.zeros(3, 5)
        try:
            model(*gpt_batch(0, rank, ODD))
            message = None
        except RuntimeError as e:
            message = str(e)
        info = sharding_info(model)
        clean = (not info.in_forward, info.gathered == ())
        param.data = kept
        losses, ref_losses = [], []
        for step in range(2):
            for m, o, ls in ((model, opt, losses), (ref, ref_opt, ref_losses)):
                loss = m(*gpt_batch(step, rank, ODD))
                loss.backward()
                o.step()
                o.zero_grad()
                ls.append(loss.detach())
        return {
            "message": message,
            "clean": clean,
            "same_object": model.blocks[1].fc1.weight is param,
            "losses": (torch.stack(losses), torch.stack(ref_losses)),
            "params": (_full_params(model), _plain_params(ref.module)),
        }

    return _cases({
        "mismatched_layers": mismatched_layers,
        "mismatched_strategy": mismatched_strategy,
        "wrong_shape_data": wrong_shape_data,
    })


@pytest.fixture(scope="module")
def errors_two_ranks():
    return run_ranks(_errors_rank, WORLD, timeout=120)


def test_error_mismatched_ranks(errors_two_ranks):
    for rank, out in enumerate(errors_two_ranks):
        other = 1 - rank
        for case in ("mismatched_layers", "mismatched_strategy"):
            message = _ok(out[case])
            assert message is not None, f"rank {rank} {case}: fully_shard did not raise"
            assert f"this rank's units differ from rank {other}'s" in message, message
            assert "every rank must build the same model" in message, message


def test_error_wrong_shape_data_at_next_forward(errors_two_ranks):
    for rank, out in enumerate(errors_two_ranks):
        result = _ok(out["wrong_shape_data"])
        message = result["message"]
        assert message is not None, f"rank {rank}: the forward did not raise"
        assert "'blocks.1.fc1.weight'" in message, message
        assert "(3, 5)" in message and "(128, 64)" in message, message
        assert result["clean"] == (True, True), f"rank {rank}: state left behind {result['clean']}"
        assert result["same_object"]
        assert_close(*result["losses"])
        _assert_same(*result["params"], f"rank {rank} after restoring .data")


# ---- 6. a hung collective fails within the timeout -------------------------------------------------
# The process group's timeout, seconds: the test waits it out once. Short, yet long enough for
# the ranks' setup collectives (init_process_group, fully_shard) on a loaded machine.
HANG_TIMEOUT = 4


def _hang_rank(rank, world):
    """Rank 0 all-gathers, rank 1 never joins: rank 0's own collective must fail within the
    group's timeout. Rank 1 stays alive (so the failure is a timeout, not a closed connection)
    until rank 0 says, through the store, that its forward has returned or raised."""
    _init_rank()
    store = dist.distributed_c10d._get_default_store()
    model = fully_shard(GPT(ODD), policy={Block})
    if rank == 1:
        store.wait(["hang/rank0_done"], datetime.timedelta(seconds=10 * HANG_TIMEOUT))
        return None
    start = time.monotonic()
    try:
        model(*gpt_batch(0, rank, ODD))
        outcome = None
    except Exception as error:  # noqa: BLE001 -- returned to the parent, which asserts on it
        cause = error.__cause__
        outcome = {
            "type": type(error).__name__,
            "collective_error": isinstance(error, fsdp_compile.CollectiveError),
            "message": str(error),
            "cause": None if cause is None else f"{type(cause).__name__}: {cause}",
            "seconds": time.monotonic() - start,
        }
    store.set("hang/rank0_done", "1")
    return outcome


def test_hung_collective_times_out():
    """Rank 0 itself raises fsdp_compile's ``CollectiveError`` (the backend's timeout chained as
    its cause) within the timeout; the harness's own deadline (``TimeoutError``, timeout + 30 s)
    failing the test instead means the collective hung past the process group's timeout."""
    rank0, rank1 = run_ranks(_hang_rank, WORLD, timeout=HANG_TIMEOUT)
    assert rank1 is None
    assert rank0 is not None, "rank 0's forward returned without rank 1 joining its all-gather"
    assert rank0["collective_error"], rank0
    assert "failed on rank 0" in rank0["message"], rank0
    assert rank0["cause"] is not None and "timed out" in rank0["cause"].lower(), rank0
    # gloo's timeout, plus slack for a loaded machine; far below the harness's deadline
    assert rank0["seconds"] < HANG_TIMEOUT + 20, rank0


# ---- 7. gradient semantics, state dicts, collective counts, freeing, memory -----------------------
def _semantics_rank(rank, world):
    _init_rank()
    batch = gpt_batch(0, rank, ODD)
    batch2 = gpt_batch(1, rank, ODD)

    def pair(strategy, seed=0, freeze=()):
        ref = _seeded(GPT, ODD, seed=seed)
        model = _seeded(GPT, ODD, seed=seed)
        for m in (ref, model):
            for name, p in m.named_parameters():
                if name in freeze:
                    p.requires_grad_(False)
        return DDP(ref), fully_shard(model, policy={Block}, strategy=strategy)

    def accumulate():
        out = {}
        for strategy in STRATEGIES:
            ref, model = pair(strategy)
            rep = strategy == "NO_SHARD"
            ref(*batch).backward()
            model(*batch).backward()
            one = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
            ref(*batch).backward()
            model(*batch).backward()
            two = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
            out[strategy] = (one, two)
        return out

    def zero_grad():
        out = {}
        for strategy in STRATEGIES:
            ref, model = pair(strategy)
            rep = strategy == "NO_SHARD"
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            model(*batch).backward()
            opt.zero_grad(set_to_none=True)
            after_none = [p.grad is None for p in model.parameters()]
            model(*batch2).backward()
            ref(*batch2).backward()
            first = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
            opt.zero_grad(set_to_none=False)
            after_zero = [p.grad is not None and not p.grad.any().item() for p in model.parameters()]
            ref.zero_grad(set_to_none=False)
            model(*batch).backward()
            ref(*batch).backward()
            second = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
            out[strategy] = (after_none, first, after_zero, second)
        return out

    frozen_names = ("pos_emb", "blocks.0.fc1.weight", "blocks.0.ln1.bias", "ln_f.weight")

    def frozen():
        out = {}
        for strategy in STRATEGIES:
            ref, model = pair(strategy, freeze=frozen_names)
            rep = strategy == "NO_SHARD"
            for _ in range(2):
                ref(*batch).backward()
                model(*batch).backward()
            out[strategy] = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
        return out

    def clip():
        out = {}
        for strategy in STRATEGIES:
            for norm_type in (2.0, float("inf")):
                ref, model = pair(strategy)
                rep = strategy == "NO_SHARD"
                ref(*batch).backward()
                model(*batch).backward()
                max_norm = 0.05
                ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
                norm = fsdp_compile.clip_grad_norm_(model, max_norm, norm_type)
                grads = (_shard_grads(model), _ddp_rows(ref.module, "grad", rank, world, rep))
                out[(strategy, norm_type)] = (norm, ref_norm, grads)
        return out

    def state_dict_roundtrip():
        out = {}
        for strategy in STRATEGIES:
            trained = fully_shard(_seeded(GPT, ODD), policy={Block}, strategy=strategy)
            opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
            trained(*batch).backward()
            opt.step()
            sd = fsdp_compile.full_state_dict(trained)
            plain = _seeded(GPT, ODD, seed=1)
            keys_match = list(sd) == list(plain.state_dict())
            plain.load_state_dict(sd)
            fresh = fully_shard(_seeded(GPT, ODD, seed=2), policy={Block}, strategy=strategy)
            before = fresh(batch[0]).detach()
            fsdp_compile.load_full_state_dict(fresh, sd)
            with torch.no_grad():
                got, want_trained, want_plain = fresh(batch[0]), trained(batch[0]), plain(batch[0])
            out[strategy] = {
                "keys_match": keys_match,
                "shapes": {k: tuple(v.shape) for k, v in sd.items()},
                "ref_shapes": {k: tuple(v.shape) for k, v in plain.state_dict().items()},
                "changed": not torch.equal(before, got),
                "outputs": (got, want_trained, want_plain),
            }
        return out

    def counts():
        out = {}
        for strategy in STRATEGIES:
            model = fully_shard(_seeded(GPT, ODD), policy={Block}, strategy=strategy)
            units = len(sharding_info(model).units)
            with mock.patch.object(collectives, "reduce_unit_grads", wraps=collectives.reduce_unit_grads) as rs, \
                 mock.patch.object(collectives, "all_gather_unit", wraps=collectives.all_gather_unit) as ag:
                per_step = []
                for step in range(2):
                    loss = model(*gpt_batch(step, rank, ODD))
                    fwd_gathers = ag.call_count
                    loss.backward()
                    per_step.append((fwd_gathers, ag.call_count - fwd_gathers, rs.call_count))
                    ag.reset_mock()
                    rs.reset_mock()
            out[strategy] = (units, per_step)
        return out

    def frees():
        out = {}
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
            model = fully_shard(_seeded(GPT, ODD), policy={Block}, strategy=strategy)
            gathered = []  # (phase, unit name, [(fqn, StorageWeakRef)])
            phase = ["forward"]
            real = collectives.all_gather_unit

            def recording(shards, layout, spec):
                fulls = real(shards, layout, spec)
                gathered.append((phase[0], [(p.fqn, StorageWeakRef(f.untyped_storage())) for p, f in zip(layout.params, fulls)]))
                return fulls

            def alive(which):
                return sorted(fqn for ph, refs in gathered if ph == which for fqn, ref in refs if not ref.expired())

            with mock.patch.object(collectives, "all_gather_unit", side_effect=recording):
                loss = model(*batch)
                after_forward = (
                    sharding_info(model).gathered,
                    alive("forward"),
                    len(gathered),
                )
                phase[0] = "backward"
                loss.backward()
                after_backward = (alive("forward"), alive("backward"), len(gathered))
            out[strategy] = (after_forward, after_backward)
        return out

    def memory():
        out = {}
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
            plain = _seeded(GPT, ODD)
            model = fully_shard(_seeded(GPT, ODD), policy={Block}, strategy=strategy)
            measured = {}
            for name, m in (("plain", plain), ("sharded", model)):
                opt = torch.optim.Adam(m.parameters(), lr=1e-3)
                m(*batch).backward()
                opt.step()
                measured[name] = _state_bytes(m, opt)
            full_shapes = [tuple(p.shape) for p in plain.parameters()]
            measured["no_full"] = sharding_info(model).gathered == ()
            measured["full_shapes"] = full_shapes
            out[strategy] = measured
        return out

    return _cases({
        "accumulate": accumulate,
        "zero_grad": zero_grad,
        "frozen": frozen,
        "clip": clip,
        "state_dict": state_dict_roundtrip,
        "counts": counts,
        "frees": frees,
        "memory": memory,
    })


def _unique_nbytes(tensors) -> int:
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes of unique storages: parameters, gradients, Adam moments (the per-parameter scalar
    ``step`` counters are bookkeeping, not model-sized, and counted separately)."""
    params = list(model.parameters())
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": _unique_nbytes(params),
        "grads": _unique_nbytes(p.grad for p in params if p.grad is not None),
        "moments": _unique_nbytes(moments),
        "steps": _unique_nbytes(s["step"] for s in opt.state.values()),
        "shard_numel": sum(p.numel() for p in params),
    }


@pytest.fixture(scope="module")
def semantics():
    return run_ranks(_semantics_rank, WORLD, timeout=240)


def test_grads_accumulate_over_two_backwards(semantics):
    for rank, out in enumerate(semantics):
        for strategy, (one, two) in _ok(out["accumulate"]).items():
            what = f"rank {rank} {strategy}"
            _assert_same(*one, f"{what} 1st backward")
            _assert_same(*two, f"{what} 2nd backward (accumulated)")
            doubled = {n: 2 * g for n, g in one[1].items()}
            _assert_same(two[0], doubled, f"{what} == 2 x one backward")


def test_zero_grad_set_to_none_and_zeros(semantics):
    for rank, out in enumerate(semantics):
        for strategy, (after_none, first, after_zero, second) in _ok(out["zero_grad"]).items():
            what = f"rank {rank} {strategy}"
            assert all(after_none), f"{what}: zero_grad(set_to_none=True) left grads"
            _assert_same(*first, f"{what} backward after set_to_none")
            assert all(after_zero), f"{what}: zero_grad(set_to_none=False) did not zero"
            _assert_same(*second, f"{what} backward after zeroing")


def test_frozen_params_grad_stays_none(semantics):
    for rank, out in enumerate(semantics):
        for strategy, (got, want) in _ok(out["frozen"]).items():
            what = f"rank {rank} {strategy}"
            assert sorted(n for n, g in want.items() if g is None) == sorted(
                ("pos_emb", "blocks.0.fc1.weight", "blocks.0.ln1.bias", "ln_f.weight")
            )
            _assert_same(got, want, what)


def test_clip_grad_norm_matches_ddp(semantics):
    for rank, out in enumerate(semantics):
        for (strategy, norm_type), (norm, ref_norm, grads) in _ok(out["clip"]).items():
            what = f"rank {rank} {strategy} norm_type={norm_type}"
            assert ref_norm > 0.05, "the reference must actually clip"
            assert_close(norm, ref_norm, msg=lambda m: f"{what} total norm: {m}")
            _assert_same(*grads, f"{what} clipped grads")
    assert_close(semantics[0]["clip"][("FULL_SHARD", 2.0)][0], semantics[1]["clip"][("FULL_SHARD", 2.0)][0])


def test_full_state_dict_roundtrip(semantics):
    for rank, out in enumerate(semantics):
        for strategy, result in _ok(out["state_dict"]).items():
            what = f"rank {rank} {strategy}"
            assert result["keys_match"], what
            assert result["shapes"] == result["ref_shapes"], what
            assert result["changed"], f"{what}: loading did not change the fresh model"
            got, want_trained, want_plain = result["outputs"]
            assert torch.equal(got, want_trained), what
            assert_close(got, want_plain, msg=lambda m: f"{what} vs plain model: {m}")


def test_one_reduce_per_unit_per_backward(semantics):
    units = 1 + ODD.layers  # one unit per Block, plus the root
    gathers_in_backward = {"FULL_SHARD": units, "SHARD_GRAD_OP": 0, "NO_SHARD": 0}
    for rank, out in enumerate(semantics):
        for strategy, (n_units, per_step) in _ok(out["counts"]).items():
            assert n_units == units
            for fwd_gathers, bwd_gathers, reduces in per_step:
                assert reduces == units, f"rank {rank} {strategy}: {reduces} reduces"
                assert fwd_gathers == units, f"rank {rank} {strategy}: {fwd_gathers} forward gathers"
                assert bwd_gathers == gathers_in_backward[strategy], f"rank {rank} {strategy}"


def test_full_shard_frees_gathered_params_after_forward(semantics):
    units = 1 + ODD.layers
    linear_weights = sorted(
        f"blocks.{i}.{name}.weight" for i in range(ODD.layers) for name in ("qkv", "proj", "fc1", "fc2")
    )
    for rank, out in enumerate(semantics):
        result = _ok(out["frees"])
        (still_gathered, alive, n), (alive_fwd_after_bw, alive_bw, n_total) = result["FULL_SHARD"]
        assert still_gathered == () and n == units
        assert alive == [], f"rank {rank} FULL_SHARD keeps {alive} after forward"
        assert n_total == 2 * units  # gathered again in backward ...
        assert alive_fwd_after_bw == [] and alive_bw == []  # ... and freed by the reduce
        (still_gathered, alive, n), (alive_fwd_after_bw, alive_bw, n_total) = result["SHARD_GRAD_OP"]
        assert still_gathered == () and n == units and n_total == units
        # Autograd keeps what backward needs (every Linear weight among them) until backward.
        assert set(linear_weights) <= set(alive), f"rank {rank} SHARD_GRAD_OP: {alive}"
        assert alive_fwd_after_bw == []


def test_memory_is_sharded(semantics):
    for rank, out in enumerate(semantics):
        for strategy, m in _ok(out["memory"]).items():
            what = f"rank {rank} {strategy}"
            shapes = m["full_shapes"]
            numel = sum(math.prod(s) for s in shapes)
            padded = sum(math.ceil(s[0] / WORLD) * math.prod(s[1:]) for s in shapes)
            mine = sum(_rows(torch.empty(s[0], 0), rank, WORLD).shape[0] * math.prod(s[1:]) for s in shapes)
            assert padded > numel / WORLD  # odd sizes: there is padding to account for
            plain, sharded = m["plain"], m["sharded"]
            # The independent reference: the unsharded model holds 4 bytes x numel of each.
            assert (plain["params"], plain["grads"], plain["moments"]) == (4 * numel, 4 * numel, 8 * numel)
            assert m["no_full"], what
            assert sharded["shard_numel"] == mine, what
            # Shards and their grads are views into one padded local flat buffer per unit.
            assert sharded["params"] == 4 * padded, what
            assert sharded["grads"] == 4 * padded, what
            # Adam allocates its moments shard-shaped (no padding).
            assert sharded["moments"] == 8 * mine, what
            assert sharded["steps"] == plain["steps"], what
            total = sharded["params"] + sharded["grads"] + sharded["moments"]
            unsharded = plain["params"] + plain["grads"] + plain["moments"]
            # Each of the four (param, grad, two moments) rounds up to at most ceil(D/world) rows.
            padding_bytes = 4 * 4 * (padded - numel / WORLD)
            assert total <= unsharded / WORLD + padding_bytes, what
            assert total == 2 * 4 * padded + 8 * mine, what


# ---- the gloo reduce-scatter (an all-to-all and a local sum) -----------------------------------
def _gloo_reduce_scatter_rank(rank, world):
    from dataclasses import replace

    from fsdp_compile.collectives import CommSpec, _reduce_scatter, reduce_scatter_kind

    _init_rank()
    group = dist.group.WORLD
    spec = CommSpec(group.group_name, world, rank, False, None, None)
    out = {"kind": reduce_scatter_kind(group, torch.device("cpu")), "no_group": reduce_scatter_kind(None, torch.device("cpu"))}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(rank)
        packed = torch.randn(world * 1001).to(dtype)
        everyone = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(everyone, packed)
        reference = sum(t.view(world, -1)[rank].double() for t in everyone)
        by_all_to_all = _reduce_scatter(packed, replace(spec, reduce_scatter="all_to_all"))
        native = _reduce_scatter(packed, spec)
        out[str(dtype)] = (reference, by_all_to_all, native)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_reduce_scatter_by_all_to_all_matches_reduce_scatter_tensor(world):
    """gloo groups reduce-scatter with an all-to-all and a sum in rank order: on 2 ranks it is
    bit-identical to ``reduce_scatter_tensor``; on 4 it matches a float64 sum of every rank's
    slot to the dtype's rounding."""
    for out in run_ranks(_gloo_reduce_scatter_rank, world, timeout=120):
        assert out["kind"] == "all_to_all" and out["no_group"] == "native"
        for dtype in (torch.float32, torch.bfloat16):
            reference, by_all_to_all, native = out[str(dtype)]
            assert by_all_to_all.dtype == native.dtype == dtype and by_all_to_all.shape == (1001,)
            if world == 2:
                assert torch.equal(by_all_to_all, native)
            tolerance = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}  # sums rounded per add
            assert_close(by_all_to_all, reference.to(dtype), **tolerance)
            assert_close(native, reference.to(dtype), **tolerance)
