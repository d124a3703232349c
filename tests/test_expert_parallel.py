"""``shard_placement_fn`` (a parameter sharded on a dim other than 0) and expert parallelism.

World 2: a model whose parameters shard on dims 1, 2 and -1 (uneven, and one dim smaller than
the world: an empty shard) trains eagerly and compiled (aot_eager) like one float64 process on
the global batch; its shards, state-dict DTensors and a state-dict round trip are checked.

World 4 (torchtitan's layout at 4 ranks with ep 2): a ``("efsdp", "ep")`` mesh, ranks
[[0, 1], [2, 3]]. Every rank reads its own batch. A top-1 MoE block's experts are split over
"ep" (DTensors ``Shard(0)`` on ``mesh["ep"]``; tokens go to their expert's rank and back with
``all_to_all_single_autograd``) and sharded over "efsdp" by their own ``fully_shard``; the rest
of the model is sharded over all 4 ranks by the outer ``fully_shard``, which adopts the
experts' units. Reference: the same model in one process, float64, on the 4 ranks' batches
(the mean of their losses), with torch's clip_grad_norm_ against ours at every step. One spawn
runs every world-4 case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.spawn import case_result, error_text, run_case, run_ranks

VOCAB, DIM, HID, SEQ, BATCH = 11, 4, 6, 3, 2
STEPS = 3
MODES = ("eager", "aot_eager")


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


class Experts(nn.Module):
    """Stacked expert weights ``[E, DIM, HID]``, ``[E, HID, DIM]``. Input: ``[E, T, DIM]``, each
    expert's view of the rank's ``T`` tokens (zero rows for tokens routed elsewhere). With an
    ``ep_mesh`` its weights are this ep rank's experts, and tokens travel to them and back by
    all-to-all (equal splits: every expert has a slot for every token, so shapes do not depend
    on the routing and every rank compiles the same graph)."""

    ep_mesh = None

    def __init__(self, experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, DIM, HID) * 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, HID, DIM) * 0.5)

    def _mlp(self, x):
        return torch.bmm(F.gelu(torch.bmm(x, _local(self.w1))), _local(self.w2))

    def forward(self, x):
        if self.ep_mesh is None:
            return self._mlp(x)
        ep = self.ep_mesh.size()
        experts, tokens, dim = x.shape
        mine = experts // ep
        got = all_to_all_single_autograd(x.reshape(-1), None, None, self.ep_mesh)
        y = self._mlp(got.view(ep, mine, tokens, dim).transpose(0, 1).reshape(mine, ep * tokens, dim))
        back = y.view(mine, ep, tokens, dim).transpose(0, 1).reshape(-1)
        return all_to_all_single_autograd(back, None, None, self.ep_mesh).view(experts, tokens, dim)


class MoE(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.router = nn.Linear(DIM, experts, bias=False)
        self.experts = Experts(experts)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, DIM)
        gate, choice = self.router(x).softmax(-1).max(-1)  # top-1
        dispatch = F.one_hot(choice, self.router.out_features).to(x.dtype).t()  # [E, T]
        self.routed = dispatch.detach().sum(1)  # tokens per expert on this rank
        y = (dispatch[:, :, None] * self.experts(dispatch[:, :, None] * x)).sum(0)
        return (y * gate[:, None]).reshape(shape)


class Block(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.moe = MoE(experts)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Model(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(experts), Block(experts)])
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).reshape(-1, VOCAB), targets.reshape(-1))


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).double()


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


MAX_NORM = 0.1  # below the gradients' norm at every step: clipping scales them


def _train(forward, model, rank, steps=STEPS, clip=False):
    """AdamW steps (with ``clip``: ``fsdp_compile.clip_grad_norm_`` before each); returns the
    losses, the optimizer and the clip's total norms."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(steps):
        loss = forward(*_batch(step, rank))
        loss.backward()
        if clip:
            norms.append(fsdp_compile.clip_grad_norm_(model, MAX_NORM).detach())
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), opt, norms and torch.stack(norms)


def reference(cls, args, world, clip=False):
    """One process, the global batch: each step's loss per rank, the final parameters and
    (with ``clip``) the total norms torch's clip_grad_norm_ returns."""
    model = _seeded(cls, *args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        per_rank = torch.stack([model(*_batch(step, r)) for r in range(world)])
        per_rank.mean().backward()
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
        losses.append(per_rank.detach())
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return torch.stack(losses), params, norms and torch.stack(norms)


def _compile(model, mode):
    if mode == "eager":
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=fsdp_compile.backend(inner=mode))


def _assert_params(got, want, what):
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert_close(got[name], value, msg=lambda m: f"{what}: {name}: {m}")


# ---- shard_placement_fn, world 2 ----------------------------------------------------------------
class Stacked(nn.Module):
    """Parameters that shard on other dims: ``w1 [3, 4, 5]`` on dim 2 (5 rows: 3 + 2),
    ``w2 [3, 5, 4]`` on dim 1, ``gate.weight [3, 4]`` on dim -1, ``scale [1, 1, 4]`` on dim 1
    (one row: rank 1's shard is empty); the rest on dim 0."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.gate = nn.Linear(4, 3)
        self.w1 = nn.Parameter(torch.randn(3, 4, 5) * 0.5)
        self.w2 = nn.Parameter(torch.randn(3, 5, 4) * 0.5)
        self.scale = nn.Parameter(torch.ones(1, 1, 4))
        self.head = nn.Linear(4, VOCAB)

    def forward(self, idx, targets):
        h = self.emb(idx)
        g = self.gate(h).softmax(-1)
        y = torch.einsum("bseh,ehd->bsed", F.gelu(torch.einsum("bsd,edh->bseh", h, self.w1)), self.w2)
        h = h + (g[..., None] * y).sum(-2) * self.scale[0]
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), targets.reshape(-1))


PLACEMENTS = {"w1": 2, "w2": 1, "gate.weight": 1, "scale": 1}  # normalized dims


def _placement_fn(model):
    """As the README's example: a placement per parameter (``gate.weight`` counted from the end)."""
    asked = {"w1": 2, "w2": 1, "gate.weight": -1, "scale": 1}
    dims = {id(p): asked[name] for name, p in model.named_parameters() if name in asked}
    return lambda p: Shard(dims[id(p)]) if id(p) in dims else None


def shard_dims_world2(rank, world):
    torch.set_num_threads(1)
    full = _seeded(Stacked).state_dict()
    out = {}
    for mode in MODES:
        model = _seeded(Stacked)
        fully_shard(model, shard_placement_fn=_placement_fn(model))
        shards = {name: p.detach().clone() for name, p in model.named_parameters()}
        sd = model.state_dict()
        losses, opt, _ = _train(_compile(model, mode), model, rank)
        fresh = _seeded(Stacked)
        fully_shard(fresh, shard_placement_fn=_placement_fn(fresh))
        fresh.load_state_dict(model.state_dict())
        out[mode] = {
            "shards": shards,
            "placements": {k: tuple(v.placements) for k, v in sd.items()},
            "local_shapes": {k: tuple(v.to_local().shape) for k, v in sd.items()},
            "losses": losses,
            "params": fsdp_compile.full_state_dict(model),
            "optim": {
                k: tuple(v.placements)
                for k, v in opt.state_dict()["state"][[n for n, _ in model.named_parameters()].index("w1")].items()
                if isinstance(v, DTensor)
            },
            "round_trip": fsdp_compile.full_state_dict(fresh),
        }
    out["full"] = full
    return out


@pytest.fixture(scope="module")
def world2():
    return run_ranks(shard_dims_world2, 2, timeout=600)


def test_shard_placement_fn_shards_each_parameter_on_its_dim_including_uneven_and_empty(world2):
    for rank, out in enumerate(world2):
        full = out["full"]
        for mode in MODES:
            got = out[mode]
            for name, value in full.items():
                dim = PLACEMENTS.get(name, 0)
                want = torch.chunk(value, 2, dim=dim)
                want = want[rank] if rank < len(want) else value.narrow(dim, 0, 0)
                assert_close(got["shards"][name], want, msg=lambda m: f"rank {rank} {mode} {name}: {m}")
                assert got["placements"][name] == (Shard(dim),), (name, got["placements"][name])
                assert got["local_shapes"][name] == tuple(want.shape), name
            assert got["optim"] == {"exp_avg": (Shard(2),), "exp_avg_sq": (Shard(2),)}
    assert tuple(world2[1]["eager"]["shards"]["scale"].shape) == (1, 0, 4)  # the empty shard


def test_shard_placement_fn_trains_like_one_process_eager_and_compiled(world2):
    ref_losses, ref_params, _ = reference(Stacked, (), 2)
    for rank, out in enumerate(world2):
        for mode in MODES:
            assert_close(out[mode]["losses"], ref_losses[:, rank], msg=lambda m: f"rank {rank} {mode}: {m}")
            _assert_params(out[mode]["params"], ref_params, f"rank {rank} {mode}")
            _assert_params(out[mode]["round_trip"], ref_params, f"rank {rank} {mode} state-dict round trip")


def _raises(fn):
    def bad(m):
        fully_shard(m, shard_placement_fn=fn)

    return bad


@pytest.mark.parametrize("fn, kind, words", [
    (lambda p: Replicate(), TypeError, ["returned Replicate()", "parameter 'w1'", "Shard(dim) or None"]),
    (lambda p: 1, TypeError, ["returned 1", "parameter 'w1'"]),
    (lambda p: Shard(3) if p.dim() == 3 else None, ValueError, ["Shard(3)", "'w1'", "(3, 4, 5)", "-3 <= d < 3"]),
    (lambda p: Shard(-4) if p.dim() == 3 else None, ValueError, ["Shard(-4)", "'w1'"]),
])
def test_shard_placement_fn_bad_return_value_names_the_parameter(fn, kind, words):
    with pytest.raises(kind) as e:
        fully_shard(Stacked(), shard_placement_fn=fn)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_shard_placement_fn_must_be_callable():
    with pytest.raises(TypeError, match="shard_placement_fn must be callable"):
        fully_shard(Stacked(), shard_placement_fn=Shard(1))


# ---- expert parallelism, world 4 --------------------------------------------------------------
EFSDP, EP = 2, 2
CASES = {  # experts, shard dim of the experts' weights (each ep rank holds experts / EP of them)
    "4 experts": (4, None),
    "2 experts, sharded on dim 1": (2, 1),  # one expert per ep rank: fewer than the efsdp ranks
}


def _meshes():
    mesh = init_device_mesh("cpu", (EFSDP, EP), mesh_dim_names=("efsdp", "ep"))
    return mesh, mesh._flatten("dp")


def shard_experts(model, mesh, dp_mesh, shard_dim=None):
    """The README's recipe (keep the two alike): experts split over "ep" and sharded over
    "efsdp", the rest of the model over dp."""
    ep_mesh = mesh["ep"]
    for block in model.blocks:
        experts = block.moe.experts
        experts.ep_mesh = ep_mesh
        for name in ("w1", "w2"):
            full = getattr(experts, name).detach()
            setattr(experts, name, nn.Parameter(distribute_tensor(full, ep_mesh, [Shard(0)])))
        fully_shard(
            experts, device_mesh=mesh["efsdp"], gradient_divide_factor=dp_mesh.size(),
            shard_placement_fn=(lambda p: Shard(shard_dim)) if shard_dim else None,
        )
    return fully_shard(model, device_mesh=dp_mesh, policy={Block})


def expert_parallel(rank, mesh, dp_mesh, experts, shard_dim, mode):
    model = shard_experts(_seeded(Model, experts), mesh, dp_mesh, shard_dim)
    torch._dynamo.utils.counters.clear()
    run = _compile(model, mode)
    losses, _, norms = _train(run, model, rank, clip=True)
    out = {
        "losses": losses,
        "norms": norms,
        "params": fsdp_compile.full_state_dict(model),
        "routed": [b.moe.routed.tolist() for b in model.blocks],
        "placements": {
            k: tuple(v.placements) for k, v in model.state_dict().items() if "experts" in k
        },
        "expert_shard": tuple(_local(model.blocks[0].moe.experts.w1).shape),
    }
    if mode != "eager":
        out["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        out["schedules"] = [dict(r.schedules) for r in fsdp_compile.sharding_info(model).compiled_graphs]
    return out


def _other_root(mesh):
    """The experts on an ep mesh of another root than their efsdp mesh, whose "ep" groups are
    the efsdp groups ({0, 2}, {1, 3}): no (efsdp, ep) mesh holds each rank once."""
    from torch.distributed.device_mesh import DeviceMesh

    other = DeviceMesh("cpu", torch.arange(4).view(EP, EFSDP).t(), mesh_dim_names=("a", "b"))
    model = _seeded(Model, 4)
    experts = model.blocks[0].moe.experts
    experts.w1 = nn.Parameter(distribute_tensor(experts.w1.detach(), other["b"], [Shard(0)]))
    fully_shard(experts, device_mesh=mesh["efsdp"])


def _outer_on_other_root(mesh):
    """The experts sharded on this root's "efsdp", the model on another root's mesh."""
    other = init_device_mesh("cpu", (EFSDP, EP), mesh_dim_names=("c", "d"))
    model = _seeded(Model, 4)
    fully_shard(model.blocks[0].moe.experts, device_mesh=mesh["efsdp"])
    fully_shard(model, device_mesh=other._flatten("cd"))


def world4_cases(rank, world):
    torch.set_num_threads(1)
    mesh, dp_mesh = _meshes()
    out = {}
    for case, (experts, dim) in CASES.items():
        for mode in MODES:
            out[(case, mode)] = run_case(lambda: expert_parallel(rank, mesh, dp_mesh, experts, dim, mode))
    out["other root"] = error_text(lambda: _other_root(mesh), (ValueError,))
    out["outer on other root"] = error_text(lambda: _outer_on_other_root(mesh), (ValueError,))
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world4_cases, 4, timeout=900)


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_trains_like_one_process_on_the_global_batch_eager_and_compiled(world4, case):
    experts, dim = CASES[case]
    ref_losses, ref_params, ref_norms = reference(Model, (experts,), 4, clip=True)
    empty = 0
    for rank, results in enumerate(world4):
        for mode in MODES:
            out = case_result(results[(case, mode)])
            what = f"{case}, rank {rank}, {mode}"
            assert_close(out["losses"], ref_losses[:, rank], msg=lambda m: f"{what}: {m}")
            assert_close(out["norms"], ref_norms, msg=lambda m: f"{what}: clip_grad_norm_: {m}")
            _assert_params(out["params"], ref_params, what)
            empty += sum(n == 0 for routed in out["routed"] for n in routed)
            mine = experts // EP
            want = (mine // EFSDP, DIM, HID) if dim is None else (mine, DIM // EFSDP, HID)
            assert out["expert_shard"] == want, what
            # FSDP2's placements on the (efsdp, ep) mesh: efsdp shards dim 0 of the ep-local
            # experts (_StridedShard: ep splits dim 0 too) or dim 1
            want_placement = _StridedShard(0, split_factor=EP) if dim is None else Shard(1)
            for name in ("blocks.0.moe.experts.w1", "blocks.1.moe.experts.w2"):
                assert out["placements"][name] == (want_placement, Shard(0)), out["placements"]
    assert empty > 0, "some rank must route no token to some expert"


def test_expert_parallel_compiles_the_same_graphs_on_every_rank(world4):
    for case in CASES:
        outs = [case_result(r[(case, "aot_eager")]) for r in world4]
        assert len({o["graphs"] for o in outs}) == 1, [o["graphs"] for o in outs]
        assert outs[0]["graphs"] <= 2, outs[0]["graphs"]  # no recompile for another routing
        assert all(o["schedules"] == outs[0]["schedules"] for o in outs)


def test_expert_parallel_meshes_of_another_root_raise_naming_the_fix(world4):
    for results in world4:
        assert "does not come from the same root mesh" in results["other root"], results["other root"]
        assert "parameter 'w1'" in results["other root"]
        text = results["outer on other root"]
        assert "submodule 'blocks.0.moe.experts'" in text and "same root mesh" in text, text
