"""FSDP over tensor parallelism on 4 real gloo ranks: a 2 x 2 ``("dp", "tp")`` mesh.

Ranks [[0, 1], [2, 3]]: TP groups {0, 1} and {2, 3} (torch's ``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel``), dp groups {0, 2} and {1, 3} (``fully_shard``). The
ranks of one TP group read the same batch; the two dp ranks read different ones. Reference: the
same model in one process, float64, on the global batch (the mean of the dp ranks' losses).
One spawn runs every case; each case returns plain data or its traceback, and the parent asserts.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.spawn import case_result, run_case, run_ranks

DP, TP = 2, 2
VOCAB, DIM, HEADS, HIDDEN, SEQ, BATCH = 23, 8, 2, 16, 6, 2
STEPS = 3
MODES = ("eager", "aot_eager")


class Block(nn.Module):
    """Attention-like and MLP halves; TP splits heads and hidden features, so the module code
    derives its local head count from the width it is given."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.norm1(x)
        head_dim = DIM // HEADS

        def heads(t):
            return t.view(b, s, -1, head_dim).transpose(1, 2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


PLAN = {
    "q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
    "fc1": ColwiseParallel(), "fc2": RowwiseParallel(),
}


def _seeded() -> Model:
    torch.manual_seed(0)
    return Model().double()


def _batch(step: int, dp_rank: int):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


@functools.lru_cache(maxsize=None)
def _mesh(dp: int, tp: int):
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _tp_model(mesh):
    model = _seeded()
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], PLAN)
    return model


def _full_params(model):
    """Global parameters by name, from the state dict (DTensors on the (dp, tp) mesh)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _compile(model, mode):
    if mode == "eager":
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=fsdp_compile.backend(inner=mode))


def _train(forward, model, dp_rank, steps=STEPS):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        loss = forward(*_batch(step, dp_rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), opt


def reference(steps=STEPS):
    """One process, the global batch: each step's loss per dp rank, and the final parameters."""
    model = _seeded()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        per_rank = [model(*_batch(step, d)) for d in range(DP)]
        torch.stack(per_rank).mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(torch.stack(per_rank).detach())
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- world 4 -----------------------------------------------------------------------------------
def parity(rank):
    mesh = _mesh(DP, TP)
    dp_rank = mesh.get_local_rank("dp")
    out = {}
    for mode in MODES:
        model = fully_shard(_tp_model(mesh), device_mesh=mesh["dp"], policy={Block})
        weight = model.blocks[0].q.weight
        losses, _ = _train(_compile(model, mode), model, dp_rank)
        out[mode] = {
            "losses": losses,
            "params": _full_params(model),
            "same_object": model.blocks[0].q.weight is weight,
            "placements": {
                k: str(v.placements) for k, v in model.state_dict().items() if isinstance(v, DTensor)
            },
        }
    return out


def world4_cases(rank, world):
    torch.set_num_threads(1)
    return {
        "parity": run_case(lambda: parity(rank)),
    }


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world4_cases, 4, timeout=900)


@pytest.fixture(scope="module")
def ref():
    return reference()


def _assert_params(got, want, what):
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert_close(got[name], value, msg=lambda m: f"{what}: {name}: {m}")


def test_fsdp_over_tp_trains_like_one_process_on_the_global_batch_eager_and_compiled(world4, ref):
    ref_losses, ref_params = ref
    for rank, result in enumerate(world4):
        out = case_result(result["parity"])
        for mode in MODES:
            got = out[mode]
            what = f"rank {rank} {mode}"
            assert_close(got["losses"], ref_losses[:, rank // TP], msg=lambda m: f"{what} losses: {m}")
            _assert_params(got["params"], ref_params, what)
            assert got["same_object"], what
