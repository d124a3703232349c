"""Per-block ("regional") compilation, the way torchtitan compiles, on 2 gloo ranks: each block
``block.compile(backend=..., fullgraph=True)`` before or after ``fully_shard``. One Dynamo graph
serves all 32 identical blocks (no recompile after the first), training equals the eager run
and DDP with the same per-block compile (float64, ranks given different data), and the one
graph holds its unit's all-gather in forward and its reduce-scatter in backward.

Also: ranks that call a compiled graph a different number of times raise a clear error on
every rank (naming the graph) instead of hanging.
"""
from __future__ import annotations

import copy
import time
import traceback

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile.testing.spawn import run_ranks

DEPTH = 32
DIM = 8
STEPS = 3


class Block(nn.Module):
    def __init__(self, dim: int = DIM):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, depth: int = DEPTH, dim: int = DIM):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x).pow(2).mean()


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(100 * step + rank))


def _train(model, rank) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        loss = model(batch(step, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _compile_blocks(model, backend):
    for block in model.blocks:
        block.compile(backend=backend, fullgraph=True)


def regional_cases(rank: int, world: int) -> dict:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = Net().double()
    aot_eager = fsdp_compile.backend(inner="aot_eager")
    out = {}

    ddp = DDP(copy.deepcopy(base))
    torch._dynamo.reset()
    _compile_blocks(ddp.module, "aot_eager")
    out["ddp"] = {"losses": _train(ddp, rank), "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}}

    eager = fsdp_compile.fully_shard(copy.deepcopy(base), policy={Block})
    out["eager"] = {"losses": _train(eager, rank), "params": fsdp_compile.full_state_dict(eager)}

    for when in ("before", "after"):
        try:
            model = copy.deepcopy(base)
            torch._dynamo.reset()
            counters.clear()
            if when == "before":
                _compile_blocks(model, aot_eager)
            fsdp_compile.fully_shard(model, policy={Block})
            if when == "after":
                _compile_blocks(model, aot_eager)
            losses = _train(model, rank)
            graphs = fsdp_compile.sharding_info(model).compiled_graphs
            out[when] = {
                "losses": losses,
                "params": fsdp_compile.full_state_dict(model),
                "unique_graphs": counters["stats"]["unique_graphs"],
                "frames_ok": counters["frames"]["ok"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "records": len(graphs),
                "forward": [c.kind for c in graphs[0].schedules["forward"]],
                "backward": [c.kind for c in graphs[0].schedules["backward"]],
            }
        except Exception:  # noqa: BLE001 -- reported by the parent
            out[when] = traceback.format_exc()
    return out


def _results():
    if not hasattr(_results, "value"):
        _results.value = run_ranks(regional_cases, 2, timeout=600)
    return _results.value


def _get(name):
    for r in _results():
        assert not isinstance(r[name], str), f"{name} failed:\n{r[name]}"
    return [(r[name], r) for r in _results()]


def test_one_graph_for_32_blocks_compiled_before_or_after_fully_shard():
    for when in ("before", "after"):
        for got, _ in _get(when):
            assert got["unique_graphs"] == 1, (when, got["unique_graphs"])  # no recompile after block 0
            assert got["graph_breaks"] == 0
            assert got["records"] == 1  # the backend ran once: one compiled graph for all blocks
            # the block's forward gathers its unit; its backward reduce-scatters it (gloo: all-to-all)
            assert got["forward"].count("all_gather_into_tensor") == 1, got["forward"]
            assert got["backward"].count("all_to_all_single") == 1, got["backward"]


def test_per_block_compile_trains_like_eager_and_ddp():
    for when in ("before", "after"):
        for got, r in _get(when):
            for ref in (r["eager"], r["ddp"]):
                assert_close(got["losses"], ref["losses"])
                assert got["params"].keys() == ref["params"].keys()
                for name, value in ref["params"].items():
                    assert_close(got["params"][name], value, msg=name)


# ---- a compiled schedule mismatch raises on every rank -----------------------------------
def mismatch_case(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = fsdp_compile.fully_shard(Net(depth=2).double(), policy={Block})
    _compile_blocks(model, fsdp_compile.backend(inner="aot_eager"))
    _train(model, rank)  # in step: compiles and runs
    start = time.monotonic()
    try:
        x = model.inp(batch(0, rank))  # outside the root forward: the block opens its own scope
        x = model.blocks[0](x)
        if rank == 0:  # rank 0 calls the compiled block graph once more than rank 1
            x = model.blocks[0](x)
        x.sum().backward()
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_ranks_calling_a_compiled_graph_a_different_number_of_times_raise_not_hang():
    results = run_ranks(mismatch_case, 2, timeout=120)
    for rank, got in enumerate(results):
        assert got["error"] is not None, f"rank {rank} did not raise"
        assert "out of step" in got["error"], got["error"]
        assert "compiled graph" in got["error"] and "'blocks.0'" in got["error"], got["error"]
        assert got["seconds"] < 10, got
