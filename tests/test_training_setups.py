"""What a large-model recipe does around the training step, on 2 gloo ranks:
meta-device init (``param_init_fn``), calling a sharded submodule on its own, ``.to(dtype)``
after ``fully_shard``, and ``to_empty``. One spawn runs every case; each returns plain data or
its traceback; the parent asserts. References: the same model built on the CPU with the same
seed (meta init must equal it exactly), an unsharded copy (submodule calls), DDP (training).
"""
from __future__ import annotations

import copy
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.loop import train_steps
from fsdp_compile.testing.memory import profile_step
from fsdp_compile.testing.spawn import run_ranks


# ---- models ---------------------------------------------------------------------------------
class Block(nn.Module):
    """LayerNorm + MLP, and a non-persistent buffer that only ``reset_parameters`` sets."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 10)
        self.fc2 = nn.Linear(10, dim)
        self.register_buffer("gate", torch.empty(dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.gate.copy_(torch.linspace(0.5, 1.0, self.gate.numel()))

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.ln(x)))) * self.gate


class TiedNet(nn.Module):
    """Embedding of 7 rows (uneven on 2 ranks) tied to the output head; two Block units."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h).logsumexp(-1).mean()


class Scaled(nn.Module):
    """A module with a parameter but no ``reset_parameters``: on meta, nothing initializes it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x) * self.scale


def _ids(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(10 * step + rank))


def _state(model) -> dict:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


# ---- cases (run inside the ranks) ---------------------------------------------------------------
def meta_equals_cpu(rank, world):
    """Built on meta and materialized by fully_shard == built on CPU with the same seed and
    sharded, for each strategy; then trained the same."""
    out = {}
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        torch.manual_seed(0)
        cpu = fully_shard(TiedNet(), policy={Block}, strategy=strategy)
        torch.manual_seed(0)
        with torch.device("meta"):
            meta = TiedNet()
        fully_shard(meta, policy={Block}, strategy=strategy)
        states = [_state(meta), _state(cpu)]
        for model in (meta, cpu):
            train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), lambda step: _ids(step, rank), 2)
        out[strategy] = {
            "initial": states,
            "tied": meta.head.weight is meta.emb.weight,
            "after": [_state(meta), _state(cpu)],
            "devices": {str(p.device) for p in meta.parameters()} | {str(b.device) for b in meta.buffers()},
        }
    return out


def meta_param_init_fn(rank, world):
    """A user's param_init_fn: called once per module holding meta tensors, in modules() order."""
    calls = []

    def init(module):
        calls.append("Scaled" if isinstance(module, Scaled) else type(module).__mro__[1].__name__)
        if isinstance(module, Scaled):
            nn.init.constant_(module.scale, 2.0)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    with torch.device("meta"):
        model = nn.Sequential(Scaled(), nn.ReLU(), Scaled())
    fully_shard(model, policy={Scaled}, param_init_fn=init)
    with fsdp_compile.summon_full_params(model, writeback=False):
        scales = [model[0].scale.clone(), model[2].scale.clone()]
    return {"calls": calls, "scales": scales, "out": model(torch.ones(2, 4)).shape}


def meta_errors(rank, world):
    out = {}
    with torch.device("meta"):
        model = nn.Sequential(Scaled())
    try:
        fully_shard(model)
    except RuntimeError as e:
        out["untouched"] = str(e)

    class NoInitBuffer(nn.Linear):
        def __init__(self):
            super().__init__(3, 3)
            self.register_buffer("table", torch.zeros(3))

    with torch.device("meta"):
        model = NoInitBuffer()
    try:
        fully_shard(model)
    except RuntimeError as e:
        out["buffer"] = str(e)
    try:
        fully_shard(nn.Linear(2, 2), param_init_fn=lambda m: None)
    except ValueError as e:
        out["not_meta"] = str(e)
    model = fully_shard(nn.Linear(2, 2))
    try:
        model.to_empty(device="cpu")
    except RuntimeError as e:
        out["to_empty"] = str(e)
    return out


def meta_memory(rank, world):
    """Peak growth of fully_shard on a meta model of 8 Linear(256, 256) units (256 KiB each)."""
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(8)])
    peak, _ = profile_step(lambda: fully_shard(model, policy={nn.Linear}))
    return {"peak": peak, "module_bytes": 256 * 256 * 4, "sharded_bytes": 8 * 128 * 256 * 4}


def submodule_calls(rank, world):
    """model[0](x) outside the root's forward, eager and compiled, returns the unsharded
    module's output and reduces its gradients like DDP would."""
    out = {}
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    for mode in ("eager", "compiled"):
        model = fully_shard(copy.deepcopy(plain), policy={nn.Linear})
        call = model[0] if mode == "eager" else torch.compile(model[0], backend=fsdp_compile.backend(inner="aot_eager"))
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
        y = call(x)
        y.square().sum().backward()
        ref = copy.deepcopy(plain)
        ref[0](x).square().sum().backward()
        grad = ref[0].weight.grad.clone()
        dist.all_reduce(grad)
        grad /= world
        with fsdp_compile.summon_full_params(model, with_grads=True, writeback=False):
            got_grad = model[0].weight.grad.clone()
        out[mode] = {
            "y": y.detach(), "ref": ref[0](x).detach(), "grad": got_grad, "ref_grad": grad,
            "last": model[2](torch.ones(2, 6)).detach(), "ref_last": plain[2](torch.ones(2, 6)).detach(),
            "shard_after": tuple(model[0].weight.shape),
        }
    return out


def to_dtype(rank, world):
    """fully_shard in float32, then .to(float64): trains like DDP in float64; .to(bfloat16)
    computes like the unsharded model in bfloat16."""
    torch.manual_seed(0)
    plain = TiedNet()
    model = fully_shard(copy.deepcopy(plain), policy={Block}).to(torch.float64)
    ref = DDP(copy.deepcopy(plain).to(torch.float64))
    losses = {
        name: train_steps(m, torch.optim.AdamW(m.parameters(), lr=1e-2), lambda step: _ids(step, rank), 3)
        for name, m in (("sharded", model), ("ddp", ref))
    }
    half = fully_shard(copy.deepcopy(plain), policy={Block}).to(torch.bfloat16)
    return {
        "losses": losses,
        "dtypes": {str(p.dtype) for p in model.parameters()},
        "params": fsdp_compile.full_state_dict(model),
        "ref_params": ref.module.state_dict(),
        "bf16": half(_ids(0, rank)).item(),
        "ref_bf16": copy.deepcopy(plain).to(torch.bfloat16)(_ids(0, rank)).item(),
    }


CASES = {
    "meta_equals_cpu": meta_equals_cpu,
    "meta_param_init_fn": meta_param_init_fn,
    "meta_errors": meta_errors,
    "meta_memory": meta_memory,
    "submodule_calls": submodule_calls,
    "to_dtype": to_dtype,
}


def all_cases(rank, world):
    out = {}
    for name, case in CASES.items():
        try:
            out[name] = case(rank, world)
        except Exception:  # noqa: BLE001 -- reported by the parent
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(all_cases, 2, timeout=600)


def _ok(results, name):
    for r in results:
        assert not isinstance(r[name], str), f"{name} failed:\n{r[name]}"
    return [r[name] for r in results]


def test_meta_init_equals_the_cpu_built_model_exactly(results):
    for per_rank in _ok(results, "meta_equals_cpu"):
        for strategy, got in per_rank.items():
            meta, cpu = got["initial"]
            assert meta.keys() == cpu.keys()
            for name in cpu:
                assert torch.equal(meta[name], cpu[name]), (strategy, name)
            assert got["tied"], "the tied head must stay the embedding's parameter"
            assert got["devices"] == {"cpu"}
            meta, cpu = got["after"]
            for name in cpu:
                assert torch.equal(meta[name], cpu[name]), (strategy, "after training", name)


def test_param_init_fn_runs_once_per_module_in_modules_order(results):
    for got in _ok(results, "meta_param_init_fn"):
        # Sequential itself holds nothing; ReLU holds nothing: neither is called.
        assert got["calls"] == ["Scaled", "Linear", "Scaled", "Linear"]
        for scale in got["scales"]:
            assert torch.equal(scale, torch.full((4,), 2.0))
        assert got["out"] == (2, 4)


def test_meta_init_errors_name_what_is_wrong(results):
    for got in _ok(results, "meta_errors"):
        assert "'0.scale'" in got["untouched"] and "param_init_fn" in got["untouched"]
        assert "'table'" in got["buffer"] and "param_init_fn" in got["buffer"]
        assert "meta device" in got["not_meta"]
        assert "param_init_fn" in got["to_empty"] and "to_empty" in got["to_empty"]


def test_meta_init_holds_one_module_full_at_a_time(results):
    """Materializing module by module: the peak is the sharded buffers (1 MiB) plus one
    module's full weight (256 KiB), never the whole unsharded model (2 MiB)."""
    for got in _ok(results, "meta_memory"):
        assert got["peak"] <= got["sharded_bytes"] + 1.5 * got["module_bytes"], got
        assert got["peak"] < 8 * got["module_bytes"], "no more than the unsharded model at any time"


def test_a_sharded_submodule_called_on_its_own_gathers_its_unit(results):
    for per_rank in _ok(results, "submodule_calls"):
        for mode, got in per_rank.items():
            assert got["y"].shape == (8, 6), mode
            assert_close(got["y"], got["ref"], msg=mode)
            assert_close(got["grad"], got["ref_grad"], msg=mode)
            assert_close(got["last"], got["ref_last"], msg=mode)
            assert got["shard_after"] == (3, 4), "outside the call the parameter is the shard again"


def test_to_dtype_after_fully_shard_trains_like_ddp(results):
    for got in _ok(results, "to_dtype"):
        assert got["dtypes"] == {"torch.float64"}
        assert_close(got["losses"]["sharded"], got["losses"]["ddp"])
        for name, value in got["ref_params"].items():
            assert_close(got["params"][name], value, msg=name)
        assert got["bf16"] == got["ref_bf16"]
