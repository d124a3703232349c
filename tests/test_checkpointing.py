"""Sharded checkpoints on real gloo ranks: ``model.state_dict()`` / optimizer state as
DTensors, ``torch.distributed.checkpoint`` save / load / async_save, the
``torch.distributed.checkpoint.state_dict`` functions, resharding (world 2 -> 3, -> 1 with
``no_dist``, -> a plain unsharded model) and the full state dicts. References: the unsharded
model's own tensors, and an uninterrupted run (resuming must give ``torch.equal`` results).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Shard
from torch.utils._pytree import tree_map_only

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.loop import train_steps
from fsdp_compile.testing.spawn import case_result, run_case, run_ranks

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)  # 7 rows: uneven on 2 and 3 ranks
        self.fc2 = nn.Linear(7, 5)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    """Units: two Blocks and the root (an embedding of 9 rows, a 2-row head: rank 2 of 3 holds
    an empty shard of it, and a 0-d temperature held by rank 0 only)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(5, 2)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return (self.head(h) / self.temperature).logsumexp(-1).mean()


def seeded_net() -> Net:
    torch.manual_seed(0)
    return Net()


def ids_for(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 9, (4, 3), generator=torch.Generator().manual_seed(10 * step + rank))


def train(forward, opt, rank, steps, start=0) -> list[float]:
    return train_steps(forward, opt, lambda step: ids_for(step, rank), steps, start)


def _sharded(strategy="FULL_SHARD"):
    model = fully_shard(seeded_net(), policy={Block}, strategy=strategy)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)



# ---- world 2 ---------------------------------------------------------------------------------
def the_reported_failure(rank, world, path):
    """Issue 12's repro: dcp.save(model.state_dict()) of a sharded Sequential; loaded back into
    the unsharded model (no_dist, in the parent) and at world 2 (here)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    model = fully_shard(copy.deepcopy(plain))
    dcp.save(model.state_dict(), checkpoint_id=path)
    fresh = fully_shard(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=path)
    fresh.load_state_dict(state)
    return {"plain": plain.state_dict(), "loaded": fsdp_compile.full_state_dict(fresh)}


def state_dict_form(rank, world):
    out = {}
    for strategy in STRATEGIES:
        model, _ = _sharded(strategy)
        sd = model.state_dict()
        shards = dict(model.named_parameters())
        out[strategy] = {
            key: {
                "type": type(v).__name__,
                "shape": tuple(v.shape),
                "shard0": isinstance(v, DTensor) and v.placements == (Shard(0),) and v.device_mesh.ndim == 1,
                "local_shape": tuple(v.to_local().shape) if isinstance(v, DTensor) else None,
                "no_copy": isinstance(v, DTensor) and v.to_local().data_ptr() == shards[key].data_ptr(),
            }
            for key, v in sd.items()
        }
    return out


def load_state_dict_forms(rank, world):
    """load_state_dict takes DTensors and full tensors; bad input is an error naming the key."""
    out = {}
    source, _ = _sharded()
    for p in source.parameters():
        with torch.no_grad():
            p.add_(1.0)
    plain = seeded_net()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    target, _ = _sharded()
    target.load_state_dict(source.state_dict())
    out["from_dtensors"] = fsdp_compile.full_state_dict(target)
    target2, _ = _sharded()
    target2.load_state_dict(plain.state_dict())
    out["from_full"] = fsdp_compile.full_state_dict(target2)
    out["reference"] = plain.state_dict()

    def error(sd, strict=True):
        try:
            _sharded()[0].load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            return str(e)
        return None

    full = plain.state_dict()
    out["missing"] = error({k: v for k, v in full.items() if k != "head.weight"})
    out["extra"] = error({**full, "head.scale": torch.ones(2)})
    out["shape"] = error({**full, "blocks.0.fc1.weight": torch.zeros(8, 5)})
    shard_shaped = dict(_sharded()[0].named_parameters())["blocks.0.fc1.weight"].detach().clone()
    out["shard_as_full"] = error({**full, "blocks.0.fc1.weight": shard_shaped})
    return out


def torch_state_dict_api(rank, world):
    """get_state_dict / set_state_dict, sharded and full (cpu_offload: rank 0 only)."""
    model, opt = _sharded()
    train(model, opt, rank, 2)
    msd, osd = get_state_dict(model, opt)
    kinds = {fqn: {k: type(v).__name__ for k, v in s.items()} for fqn, s in osd["state"].items()}
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # .clone(): whole tensors (the 0-d temperature) come back as the live parameter, as torch does
    full_model = {k: v.clone() for k, v in get_model_state_dict(model, options=full_opts).items()}
    full_optim = get_optimizer_state_dict(model, opt, options=full_opts)
    reference = fsdp_compile.full_state_dict(model)
    # set_state_dict, sharded: into a fresh model and optimizer, then one more step each
    fresh, fresh_opt = _sharded()
    # As read back from storage: copies (a live state dict's tensors are the optimizer's own,
    # which torch's Optimizer.load_state_dict would share, not copy).
    msd, osd = tree_map_only(torch.Tensor, torch.clone, (msd, osd))
    set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
    cont = train(model, opt, rank, 1, start=2)
    cont_fresh = train(fresh, fresh_opt, rank, 1, start=2)
    # full state, broadcast from rank 0 (set_state_dict would treat {} on rank 1 as "optimizer
    # only": torch's own rule, so the model and optimizer are set separately, as torch documents)
    other, other_opt = _sharded()
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(other, full_model if rank == 0 else {}, options=broadcast)
    set_optimizer_state_dict(other, other_opt, full_optim if rank == 0 else {}, options=broadcast)
    return {
        "model_kinds": {k: type(v).__name__ for k, v in msd.items()},
        "optim_kinds": kinds,
        "full_model": full_model,
        "full_optim_shapes": {f: {k: tuple(v.shape) for k, v in s.items()} for f, s in full_optim.get("state", {}).items()},
        "reference": reference,
        "resumed": (cont, cont_fresh, fsdp_compile.full_state_dict(model), fsdp_compile.full_state_dict(fresh)),
        "after_full_load": fsdp_compile.full_state_dict(other),
        "after_full_load_optim": fsdp_compile.full_optim_state_dict(other, other_opt),
        "full_optim": full_optim if rank == 0 else None,
    }


def resume(rank, world, path, strategy, mode, async_save):
    """Train 2 steps, save model+optimizer with DCP, train 2 more; a fresh run loads and trains
    the same 2 steps: losses and parameters must be torch.equal."""
    backend = fsdp_compile.backend(inner="aot_eager")

    def run(model):
        return model if mode == "eager" else torch.compile(model, backend=backend)

    model, opt = _sharded(strategy)
    forward = run(model)
    train(forward, opt, rank, 2)
    target = forward if mode == "compiled" else model  # compiled: the OptimizedModule itself
    msd, osd = get_state_dict(target, opt)
    if async_save:
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path).result()
    else:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    keys = sorted(msd)
    uninterrupted = train(forward, opt, rank, 2, start=2)
    fresh, fresh_opt = _sharded(strategy)
    fresh_forward = run(fresh)
    fresh_target = fresh_forward if mode == "compiled" else fresh
    msd2, osd2 = get_state_dict(fresh_target, fresh_opt)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh_target, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = train(fresh_forward, fresh_opt, rank, 2, start=2)
    return {
        "keys": keys,
        "losses": (uninterrupted, resumed),
        "params": (fsdp_compile.full_state_dict(model), fsdp_compile.full_state_dict(fresh)),
        "optim": (fsdp_compile.full_optim_state_dict(model, opt), fsdp_compile.full_optim_state_dict(fresh, fresh_opt)),
    }


def save_for_resharding(rank, world, path):
    model, opt = _sharded()
    train(model, opt, rank, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return {"model": fsdp_compile.full_state_dict(model), "optim": fsdp_compile.full_optim_state_dict(model, opt)}


def full_dicts(rank, world):
    model, opt = _sharded()
    train(model, opt, rank, 2)
    everywhere = fsdp_compile.full_state_dict(model)
    rank0 = fsdp_compile.full_state_dict(model, rank0_only=True)
    optim_full = fsdp_compile.full_optim_state_dict(model, opt)
    optim_rank0 = fsdp_compile.full_optim_state_dict(model, opt, rank0_only=True)
    fresh, fresh_opt = _sharded()
    fsdp_compile.load_full_state_dict(fresh, everywhere)
    fsdp_compile.load_full_optim_state_dict(fresh, fresh_opt, optim_rank0 if rank == 0 else {}, rank0_only=True)
    return {
        "everywhere": everywhere,
        "rank0_keys": sorted(rank0),
        "rank0_devices": {str(v.device) for v in rank0.values()},
        "optim_full": optim_full,
        "optim_rank0_empty": not optim_rank0,
        "continued": (train(model, opt, rank, 1, start=2), train(fresh, fresh_opt, rank, 1, start=2)),
    }


def world2_cases(rank, world, tmp):
    out = {
        "reported": run_case(lambda: the_reported_failure(rank, world, f"{tmp}/reported")),
        "form": run_case(lambda: state_dict_form(rank, world)),
        "load_forms": run_case(lambda: load_state_dict_forms(rank, world)),
        "torch_api": run_case(lambda: torch_state_dict_api(rank, world)),
        "full_dicts": run_case(lambda: full_dicts(rank, world)),
        "save_for_resharding": run_case(lambda: save_for_resharding(rank, world, f"{tmp}/reshard")),
    }
    for strategy in STRATEGIES:
        for mode in ("eager", "compiled"):
            path = f"{tmp}/resume_{strategy}_{mode}"
            out[("resume", strategy, mode)] = run_case(
                lambda: resume(rank, world, path, strategy, mode, async_save=mode == "eager" and strategy == "FULL_SHARD")
            )
    return out


# ---- world 3: load the world-2 checkpoint ----------------------------------------------------
def load_at_world3(rank, world, path):
    def run():
        model, opt = _sharded()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items() if isinstance(v, DTensor)}
        return {
            "model": fsdp_compile.full_state_dict(model),
            "optim": fsdp_compile.full_optim_state_dict(model, opt),
            "local_shapes": local,
        }

    return run_case(run)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    return tmp, run_ranks(world2_cases, 2, str(tmp), timeout=900)



def _assert_equal_dicts(got, want, what=""):
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_equal_dicts(got[key], value, f"{what} {key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{what} {key}"
        else:  # param_groups: a broadcast turns tuples (betas) into lists
            assert _plain(got[key]) == _plain(value), f"{what} {key}"


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_the_reported_failure_saves_every_row(world2):
    tmp, results = world2
    for r in results:
        got = case_result(r["reported"])
        _assert_equal_dicts(got["loaded"], got["plain"])
    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=str(tmp / "reported"), no_dist=True)  # into an unsharded model
    _assert_equal_dicts(state, results[0]["reported"]["plain"])


def test_state_dict_holds_dtensors_of_the_full_shape_viewing_the_shards(world2):
    full = {k: tuple(v.shape) for k, v in seeded_net().state_dict().items()}
    for rank, r in enumerate(case_result(r) for r in (x["form"] for x in world2[1])):
        for strategy, entries in r.items():
            assert {k: e["shape"] for k, e in entries.items()} == full
            for key, e in entries.items():
                if strategy == "NO_SHARD" or key == "temperature":  # whole tensors: plain
                    assert e["type"] == "Tensor", (strategy, key)
                    continue
                assert e["type"] == "DTensor" and e["shard0"], (strategy, key)
                rows = -(-full[key][0] // 2)
                want = min(rows, max(0, full[key][0] - rank * rows))
                assert e["local_shape"] == (want, *full[key][1:]), (strategy, key)
                assert e["no_copy"], (strategy, key)


def test_load_state_dict_takes_dtensors_and_full_tensors_and_rejects_bad_input(world2):
    for r in world2[1]:
        got = case_result(r["load_forms"])
        _assert_equal_dicts(got["from_dtensors"], got["reference"])
        _assert_equal_dicts(got["from_full"], got["reference"])
        assert "Missing key(s)" in got["missing"] and "head.weight" in got["missing"]
        assert "Unexpected key(s)" in got["extra"] and "head.scale" in got["extra"]
        assert "size mismatch for blocks.0.fc1.weight" in got["shape"] and "(8, 5)" in got["shape"]
        assert "blocks.0.fc1.weight" in got["shard_as_full"] and "local shard" in got["shard_as_full"]


def test_torch_state_dict_functions(world2):
    for rank, r in enumerate(world2[1]):
        got = case_result(r["torch_api"])
        assert got["model_kinds"]["blocks.0.fc1.weight"] == "DTensor"
        assert got["optim_kinds"]["blocks.0.fc1.weight"] == {"step": "Tensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor"}
        if rank == 0:
            _assert_equal_dicts(got["full_model"], got["reference"])
            assert got["full_optim_shapes"]["blocks.0.fc1.weight"]["exp_avg"] == (7, 5)
        else:
            assert got["full_model"] == {}  # cpu_offload + full: rank 0 only
        cont, cont_fresh, params, params_fresh = got["resumed"]
        assert cont == cont_fresh
        _assert_equal_dicts(params_fresh, params)
        _assert_equal_dicts(got["after_full_load"], got["reference"])
        if rank == 0:
            _assert_equal_dicts(got["after_full_load_optim"], got["full_optim"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_dcp_resume_equals_an_uninterrupted_run(world2, strategy, mode):
    for r in world2[1]:
        got = case_result(r[("resume", strategy, mode)])
        assert not any("_orig_mod" in k for k in got["keys"])
        uninterrupted, resumed = got["losses"]
        assert resumed == uninterrupted
        _assert_equal_dicts(got["params"][1], got["params"][0])
        _assert_equal_dicts(got["optim"][1], got["optim"][0])


def test_full_state_dicts_and_rank0_only(world2):
    for rank, r in enumerate(world2[1]):
        got = case_result(r["full_dicts"])
        full = {k: tuple(v.shape) for k, v in seeded_net().state_dict().items()}
        assert {k: tuple(v.shape) for k, v in got["everywhere"].items()} == full
        if rank == 0:
            assert got["rank0_keys"] == sorted(full) and got["rank0_devices"] == {"cpu"}
        else:
            assert got["rank0_keys"] == [] and got["optim_rank0_empty"]
        assert got["optim_full"]["state"]["blocks.0.fc1.weight"]["exp_avg"].shape == (7, 5)
        continued, continued_fresh = got["continued"]
        assert continued == continued_fresh


def test_reshard_world2_checkpoint_to_world3_world1_and_an_unsharded_model(world2):
    tmp, results = world2
    saved = case_result(results[0]["save_for_resharding"])
    path = str(tmp / "reshard")
    for got in run_ranks(load_at_world3, 3, path, timeout=300):
        got = case_result(got)
        _assert_equal_dicts(got["model"], saved["model"], "world 3 model")
        _assert_equal_dicts(got["optim"], saved["optim"], "world 3 optimizer")
    assert got["local_shapes"]["head.weight"] == (0, 5)  # rank 2 of 3: 2 rows split 1, 1, 0
    # world 1, no process group: into a plain unsharded model and its optimizer
    plain = seeded_net()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    msd, osd = get_state_dict(plain, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    set_state_dict(plain, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _assert_equal_dicts(plain.state_dict(), saved["model"], "unsharded model")
    _assert_equal_dicts(get_optimizer_state_dict(plain, opt), saved["optim"], "unsharded optimizer")
    # world 1 with fully_shard (no process group): the same
    single = fully_shard(seeded_net(), policy={Block})
    state = {"model": single.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    single.load_state_dict(state["model"])
    _assert_equal_dicts(fsdp_compile.full_state_dict(single), saved["model"], "world 1 fully_shard")
    assert not dist.is_initialized()
