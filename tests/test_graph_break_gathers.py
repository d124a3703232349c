"""A unit whose forward a graph break splits, under whole-model ``torch.compile`` (``aot_eager``)
on 2 gloo ranks: ``torch._dynamo.graph_break()`` and a Python branch on ``.item()`` that the
ranks take differently (different data). The unit is gathered once per forward however many
graphs run its forward (the resumed graphs read the first graph's gathered tensors), its
gradients are reduced once per backward, no graph recompiles once both branches are compiled,
and training equals DDP in float64 to rounding. Also with ``torch.utils.checkpoint`` around
each unit (non-reentrant).

Collectives are counted with the profiler over whole steps after warm-up (a
``TorchDispatchMode`` would make Dynamo run uncompiled frames eagerly instead).
"""
from __future__ import annotations

import copy
import traceback

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import fsdp_compile
from fsdp_compile.testing.memory import profile_step
from fsdp_compile.testing.reference import FLOAT64_ROUNDING
from fsdp_compile.testing.spawn import run_ranks

DIM = 6
STEPS = 5
COUNTED = (3, 4)  # steps whose collectives are counted (after both branches compiled on each rank)
ALL_GATHER = "_c10d_functional::all_gather_into_tensor"
REDUCTIONS = ("_c10d_functional::reduce_scatter_tensor", "_c10d_functional::all_to_all_single")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)
        self.taken: list[bool] = []  # the branch of each eager forward (DDP's run)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        torch._dynamo.graph_break()
        positive = h.sum().item() > 0
        if not torch.compiler.is_compiling():
            self.taken.append(positive)
        if positive:
            h = self.fc2(h)
        else:
            h = self.fc2(h * 2) - 1
        return x + h * self.fc1.bias.sum()  # a read of the first graph's parameter after the break


class Net(nn.Module):
    def __init__(self, ckpt: bool):
        super().__init__()
        self.ckpt = ckpt
        self.inp = nn.Linear(DIM, DIM)
        self.b0 = Block()
        self.b1 = Block()
        self.out = nn.Linear(DIM, 1)

    def block(self, block, x):
        return checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)

    def forward(self, x):
        x = self.inp(x)
        x = self.block(self.b0, x)
        x = self.block(self.b1, x)
        return self.out(x).pow(2).mean()


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))


def collectives(fn) -> tuple:
    """``fn()``, its all-gathers and its reductions (gloo: all-to-alls), as the profiler saw them run."""
    result = []
    _, names = profile_step(lambda: result.append(fn()), count_prefixes=(ALL_GATHER, *REDUCTIONS))
    return result[0], names.get(ALL_GATHER, 0), sum(names.get(n, 0) for n in REDUCTIONS)


def train(model, forward, rank: int, count: bool):
    from torch._dynamo.utils import counters

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, counts = [], []
    for step in range(STEPS):
        x = batch(step, rank)
        if count and step in COUNTED:
            graphs = counters["stats"]["unique_graphs"]
            loss, gathers, forward_reductions = collectives(lambda: forward(x))
            _, backward_gathers, reductions = collectives(loss.backward)
            counts.append({"gathers": gathers, "forward_reductions": forward_reductions,
                           "backward_gathers": backward_gathers, "reductions": reductions,
                           "compiled": counters["stats"]["unique_graphs"] - graphs})
        else:
            loss = forward(x)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, counts


def cases(rank: int, world: int, ckpt: bool) -> dict:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = Net(ckpt).double()
    ddp = DDP(copy.deepcopy(base))
    losses, _ = train(ddp, ddp, rank, count=False)
    out = {
        "ddp": {"losses": losses, "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
                "taken": ddp.module.b0.taken + ddp.module.b1.taken},
    }
    try:
        model = fsdp_compile.fully_shard(copy.deepcopy(base), policy={Block})
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"))
        losses, counts = train(model, compiled, rank, count=True)
        out["compiled"] = {
            "losses": losses, "params": fsdp_compile.full_state_dict(model), "counts": counts,
            "units": len(fsdp_compile.sharding_info(model).units),
            "graph_breaks": sum(counters["graph_break"].values()),
        }
    except Exception:  # noqa: BLE001 -- reported by the parent
        out["compiled"] = traceback.format_exc()
    return out


def _check(ckpt: bool):
    results = run_ranks(cases, 2, ckpt, timeout=600)
    # the ranks' data take different branches in some step (else the test shows less)
    assert any(a != b for a, b in zip(results[0]["ddp"]["taken"], results[1]["ddp"]["taken"]))
    for rank, r in enumerate(results):
        got = r["compiled"]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert got["graph_breaks"] > 0
        assert got["units"] == 3  # the root and two blocks
        for step in got["counts"]:
            assert step["compiled"] == 0, got["counts"]  # nothing recompiles once warm
            # each unit gathered once per forward, however many graphs its forward runs in
            assert step["gathers"] == got["units"], got["counts"]
            assert step["forward_reductions"] == 0, got["counts"]
            # and its gradients reduced once per backward (FULL_SHARD: the blocks regather)
            assert step["reductions"] == got["units"], got["counts"]
            assert step["backward_gathers"] <= got["units"], got["counts"]
        assert_close(got["losses"], r["ddp"]["losses"], **FLOAT64_ROUNDING)
        for name, value in r["ddp"]["params"].items():
            assert_close(got["params"][name], value, **FLOAT64_ROUNDING, msg=name)


def test_a_unit_split_by_graph_breaks_is_gathered_once_per_forward():
    _check(ckpt=False)


def test_a_checkpointed_unit_split_by_graph_breaks_is_gathered_once_per_forward():
    _check(ckpt=True)
