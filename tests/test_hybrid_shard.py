"""Hybrid sharding on 4 real gloo ranks: a 2 x 2 ``("replicate", "shard")`` mesh.

Ranks [[0, 1], [2, 3]]: shard groups {0, 1} and {2, 3}, replicate groups {0, 2} and {1, 3}.
References: DDP over all four ranks (float64, same data per rank, gradient accumulation with
``no_sync``), a hand-written bf16 reference for mixed precision, and the checkpoint's own full
state for resharding (2 x 2 -> 1 x 3 -> a plain 1-D world of 2). One spawn per world size runs
every case; each case returns plain data or its traceback, and the parent asserts. A world-4
spawn of its own (slow) compiles HYBRID_SHARD_ZERO2 and the bf16 case.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile import MixedPrecision, ShardingStrategy, fully_shard
from fsdp_compile.gloo_worker import worker_threads
from fsdp_compile.testing.gpt import GPT, Block, GPTConfig, gpt_batch, param_groups
from fsdp_compile.testing.graphs import REDUCE_SCATTER
from fsdp_compile.testing.loop import optimizer_step
from fsdp_compile.testing.reference import manual_mixed_precision
from fsdp_compile.testing.spawn import case_result, error_text, run_case, run_ranks

CFG = GPTConfig(vocab=37, dim=16, layers=2, heads=2, seq=8)  # 37 rows: 19 + 18 per shard rank
# (strategy, mode) runs of parity(): both strategies eagerly, HYBRID_SHARD compiled; the second
# strategy compiled (the same passes, without backward regathers) in a slow spawn of its own,
# world4_slow, with the compiled bf16 case
CASES = (("HYBRID_SHARD", "eager"), ("HYBRID_SHARD", "aot_eager"), ("HYBRID_SHARD_ZERO2", "eager"))
SLOW_CASES = (("HYBRID_SHARD_ZERO2", "aot_eager"),)
STEPS = 3
BF16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@functools.lru_cache(maxsize=None)  # one mesh (and its process groups) per shape and process
def _mesh(replicas: int, shards: int):
    return init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))


def _seeded(dtype=torch.float64) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).to(dtype)


def _batch(step: int, rank: int, micro: int = 0):
    return gpt_batch(10 * step + micro, rank, CFG, batch=2)



def _train(forward, model, rank, sync_only_first=True):
    """STEPS AdamW steps; from step 1 on each step accumulates two micro-batches, the first
    inside ``no_sync`` (``no_sync(model)`` is the model's own context manager)."""
    opt = torch.optim.AdamW(param_groups(model))
    losses = []
    for step in range(STEPS):
        if step > 0 or not sync_only_first:
            with model.no_sync() if isinstance(model, DDP) else fsdp_compile.no_sync(model):
                forward(*_batch(step, rank, 1)).backward()
        losses.append(optimizer_step(forward, opt, *_batch(step, rank)))
    return torch.stack(losses), opt


def _full(model):
    with fsdp_compile.summon_full_params(model, writeback=False):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _hybrid(strategy, mixed_precision=None, dtype=torch.float64):
    model = _seeded(dtype)
    return fully_shard(model, device_mesh=_mesh(2, 2), policy={Block}, strategy=strategy, mixed_precision=mixed_precision)


def _compile(model, mode):
    if mode == "eager":
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=fsdp_compile.backend(inner=mode))


# ---- world 4 -----------------------------------------------------------------------------------
def parity(rank, cases=CASES):
    ddp = DDP(_seeded())
    out = {"ddp": (_train(ddp, ddp, rank)[0], {n: p.detach().clone() for n, p in ddp.module.named_parameters()})}
    for strategy, mode in cases:
        model = _hybrid(strategy)
        run = _compile(model, mode)
        losses, _ = _train(run, model, rank)
        info = fsdp_compile.sharding_info(model)
        out[(strategy, mode)] = {
            "losses": losses,
            "params": _full(model),
            "strategies": {u.strategy.name for u in info.units},
            # gloo_worker.py: both groups' collectives run one at a time, on one-worker twins
            "worker_threads": {
                (worker_threads(u.spec.group_name), worker_threads(u.spec.replicate_group_name))
                for u in info.units
            },
            "schedules": [dict(r.schedules) for r in info.compiled_graphs],
            "modes": [[g.mode for g in r.gathers] for r in info.compiled_graphs],
            "explain": fsdp_compile.explain(run) if rank == 0 and mode != "eager" else "",
        }
    return out


def mixed_precision(rank, world, modes=("eager",)):
    # a no_sync micro-batch in every step, accumulated in the reduce dtype (fp32): compiled (the
    # slow spawn), the no_sync graph and the sync graph after it
    out = {"reference": manual_mixed_precision(
        _seeded(torch.float32), param_groups, lambda step: [_batch(step, rank, 1), _batch(step, rank)], STEPS,
    )}
    for mode in modes:
        model = _hybrid("HYBRID_SHARD", BF16, torch.float32)
        run = _compile(model, mode)
        out[mode] = (_train(run, model, rank, sync_only_first=False)[0], _full(model))
    return out


def save_checkpoint(rank, path):
    model = _hybrid("HYBRID_SHARD")
    _, opt = _train(model, model, rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    full = fsdp_compile.full_state_dict(model)
    full_optim = fsdp_compile.full_optim_state_dict(model, opt)
    if rank == 0:
        torch.save({"model": full, "optim": full_optim}, f"{path}.full.pt")
    placements = {k: str(v.placements) for k, v in msd.items() if hasattr(v, "placements")}
    return {"model": full, "optim": full_optim, "placements": placements}


def out_of_step(rank):
    """One rank inside no_sync (eager), then one rank with a frozen block (compiled): every rank
    of both groups raises instead of hanging."""
    out = {}
    model = _hybrid("HYBRID_SHARD")
    try:
        if rank == 3:
            with fsdp_compile.no_sync(model):
                model(*_batch(0, rank)).backward()
        else:
            model(*_batch(0, rank)).backward()
        out["no_sync"] = "no error"
    except RuntimeError as e:
        out["no_sync"] = str(e)
    model = _hybrid("HYBRID_SHARD")
    if rank == 3:
        model.blocks[1].requires_grad_(False)
    try:
        _compile(model, "aot_eager")(*_batch(0, rank)).backward()
        out["frozen"] = "no error"
    except RuntimeError as e:
        out["frozen"] = str(e)
    return out


def world4_cases(rank, world, tmp):
    torch.set_num_threads(1)
    return {
        "parity": run_case(lambda: parity(rank)),
        "mixed_precision": run_case(lambda: mixed_precision(rank, world)),
        "checkpoint": run_case(lambda: save_checkpoint(rank, f"{tmp}/ckpt")),
        "out_of_step": run_case(lambda: out_of_step(rank)),
    }


# ---- other worlds: load the 2 x 2 checkpoint -----------------------------------------------------
def load_checkpoint(rank, world, path, mesh_shape):
    def run():
        mesh = _mesh(*mesh_shape) if mesh_shape else None
        model = fully_shard(_seeded(), device_mesh=mesh, policy={Block})
        opt = torch.optim.AdamW(param_groups(model))
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        out = {
            "strategies": {u.strategy.name for u in fsdp_compile.sharding_info(model).units},
            "dcp": (fsdp_compile.full_state_dict(model), fsdp_compile.full_optim_state_dict(model, opt)),
        }
        saved = torch.load(f"{path}.full.pt", weights_only=False)
        fresh = fully_shard(_seeded(), device_mesh=mesh, policy={Block})
        fresh_opt = torch.optim.AdamW(param_groups(fresh))
        fsdp_compile.load_full_state_dict(fresh, saved["model"])
        fsdp_compile.load_full_optim_state_dict(fresh, fresh_opt, saved["optim"])
        out["full"] = (fsdp_compile.full_state_dict(fresh), fsdp_compile.full_optim_state_dict(fresh, fresh_opt))
        return out

    return run_case(run)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hsdp")
    return tmp, run_ranks(world4_cases, 4, str(tmp), timeout=900)


def world4_slow_cases(rank, world):
    """The compiled combinations the default spawn leaves out: HYBRID_SHARD_ZERO2 and bf16."""
    torch.set_num_threads(1)
    return {
        "parity": run_case(lambda: parity(rank, SLOW_CASES)),
        "mixed_precision": run_case(lambda: mixed_precision(rank, world, modes=("aot_eager",))),
    }


@pytest.fixture(scope="module")
def world4_slow():
    return run_ranks(world4_slow_cases, 4, timeout=900)



def _assert_params(got, want, what):
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert_close(got[name], value, msg=lambda m: f"{what}: {name}: {m}")


def _assert_trains_like_ddp(results, cases):
    for rank, result in enumerate(results):
        out = case_result(result["parity"])
        ddp_losses, ddp_params = out["ddp"]
        for strategy, mode in cases:
            got = out[(strategy, mode)]
            what = f"rank {rank} {strategy} {mode}"
            assert got["strategies"] == {strategy}, what
            assert got["worker_threads"] == {(1, 1)}, what
            assert_close(got["losses"], ddp_losses, msg=lambda m: f"{what} losses: {m}")
            _assert_params(got["params"], ddp_params, what)
    # Four different data streams: every rank's losses differ.
    assert len({tuple(case_result(r["parity"])["ddp"][0].tolist()) for r in results}) == 4


def test_both_hybrid_strategies_train_like_ddp_over_the_whole_world_eager_and_compiled(world4):
    """Both strategies eagerly, HYBRID_SHARD compiled; HYBRID_SHARD_ZERO2 compiled: the slow
    test_hybrid_zero2_compiled_trains_like_ddp_and_never_regathers_in_backward."""
    _assert_trains_like_ddp(world4[1], CASES)


def _kinds(schedule):
    return [(c.kind, c.group) for c in schedule]


def _assert_compiled_graphs(results, strategy):
    """Per unit (3: the root and two blocks): forward 1 all-gather on the shard group; backward
    1 reduce-scatter on the shard group, then 1 all-reduce of the reduced shard (a shard_size-th
    of its input) on the replicate group, plus the regather of each block for HYBRID_SHARD (the
    root stays gathered from forward to backward, as FSDP2's). A no_sync graph's backward
    communicates on neither group."""
    ag, rs, ar = "all_gather_into_tensor", REDUCE_SCATTER, "all_reduce"
    for rank, result in enumerate(results):
        out = case_result(result["parity"])
        got = out[(strategy, "aot_eager")]
        graphs = dict(zip(map(tuple, got["modes"]), got["schedules"]))
        sync = graphs[(0, 0, 0)]
        assert _kinds(sync["forward"]) == [(ag, "shard")] * 3, (rank, strategy)
        backward = sync["backward"]
        reductions = [c for c in backward if c.kind != ag]
        assert _kinds(reductions) == [(rs, "shard"), (ar, "replicate")] * 3, (rank, strategy)
        for scatter, allreduce in zip(reductions[::2], reductions[1::2]):
            assert allreduce.input_bytes * 2 == scatter.input_bytes
        regathers = [c for c in backward if c.kind == ag]
        assert all(c.group == "shard" for c in regathers)
        if strategy == "HYBRID_SHARD":
            # both blocks; the root stays gathered from forward (keep_root_gathered)
            assert len(regathers) == 2, (rank, strategy, _kinds(backward))
        else:
            assert regathers == [], (rank, strategy)
        no_sync = graphs[(1, 1, 1)]
        assert _kinds(no_sync["forward"]) == [(ag, "shard")] * 3
        assert [c for c in no_sync["backward"] if c.kind != ag] == []
        pending = graphs[(2, 2, 2)]  # the sync micro-batch after no_sync: reduces once
        assert _kinds([c for c in pending["backward"] if c.kind != ag]) == [(rs, "shard"), (ar, "replicate")] * 3


def test_compiled_graphs_gather_on_the_shard_group_and_reduce_on_both(world4):
    _assert_compiled_graphs(world4[1], "HYBRID_SHARD")


@pytest.mark.slow  # world4_slow: a world-4 spawn of its own
def test_hybrid_zero2_compiled_trains_like_ddp_and_never_regathers_in_backward(world4_slow):
    _assert_trains_like_ddp(world4_slow, SLOW_CASES)
    _assert_compiled_graphs(world4_slow, "HYBRID_SHARD_ZERO2")


def test_explain_names_the_group_of_each_collective(world4):
    text = case_result(world4[1][0]["parity"])[("HYBRID_SHARD", "aot_eager")]["explain"]
    assert "HYBRID_SHARD, world 2 x 2 replicas" in text
    assert "shard group: global ranks [0, 1]" in text
    assert "replicate group: global ranks [0, 2]" in text
    assert "on replicate group" in text and "on shard group" in text


def _assert_mixed_precision(results, modes):
    for rank, result in enumerate(results):
        out = case_result(result["mixed_precision"])
        ref_losses, ref_params = out["reference"]
        for mode in modes:
            losses, params = out[mode]
            what = f"rank {rank} bf16 {mode}"
            assert_close(losses, ref_losses, msg=lambda m: f"{what} losses: {m}")
            assert all(p.dtype == torch.float32 for p in params.values()), what
            _assert_params(params, ref_params, what)


def test_mixed_precision_hybrid_matches_a_hand_written_bf16_reference(world4):
    """Eagerly; compiled: the slow test below."""
    _assert_mixed_precision(world4[1], ("eager",))


@pytest.mark.slow  # world4_slow: a world-4 spawn of its own
def test_compiled_mixed_precision_hybrid_matches_a_hand_written_bf16_reference(world4_slow):
    _assert_mixed_precision(world4_slow, ("aot_eager",))


def test_ranks_out_of_step_raise_on_every_rank_of_both_groups(world4):
    for rank, result in enumerate(world4[1]):
        out = case_result(result["out_of_step"])
        assert "ranks are out of step" in out["no_sync"], (rank, out["no_sync"])
        assert "rank 3" in out["no_sync"] or rank == 3, (rank, out["no_sync"])
        assert "issues collectives" in out["frozen"], (rank, out["frozen"])
        assert "replicate" in out["frozen"], (rank, out["frozen"])


def test_state_dicts_hold_dtensors_on_the_2d_mesh(world4):
    placements = case_result(world4[1][0]["checkpoint"])["placements"]
    assert placements["blocks.0.fc1.weight"] == "(Replicate(), Shard(dim=0))"
    assert placements["tok_emb.weight"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.parametrize("world, mesh_shape", [(3, (1, 3)), (2, None)], ids=["mesh_1x3", "world2_1d"])
def test_a_2x2_checkpoint_loads_on_a_1x3_mesh_and_a_1d_world_of_2(world4, world, mesh_shape):
    tmp, results = world4
    saved = case_result(results[0]["checkpoint"])
    want = "HYBRID_SHARD" if mesh_shape else "FULL_SHARD"
    for rank, got in enumerate(run_ranks(load_checkpoint, world, f"{tmp}/ckpt", mesh_shape, timeout=300)):
        got = case_result(got)
        assert got["strategies"] == {want}
        for how in ("dcp", "full"):
            model, optim = got[how]
            what = f"world {world} rank {rank} {how}"
            _assert_params(model, saved["model"], what)
            assert optim["state"].keys() == saved["optim"]["state"].keys(), what
            for key, per_param in saved["optim"]["state"].items():
                for k, v in per_param.items():
                    assert_close(optim["state"][key][k], v, rtol=0, atol=0, msg=lambda m: f"{what} {key}.{k}: {m}")


# ---- argument errors (no process group needed for most) ------------------------------------------
def bad_meshes(rank, world):
    mesh_of = init_device_mesh
    cases = {
        "both": lambda: fully_shard(_seeded(), process_group=dist.group.WORLD, device_mesh=_mesh(1, 2)),
        "names": lambda: fully_shard(_seeded(), device_mesh=mesh_of("cpu", (1, 2), mesh_dim_names=("dp", "tp"))),
        "hybrid_1d": lambda: fully_shard(_seeded(), device_mesh=mesh_of("cpu", (world,)), strategy="HYBRID_SHARD"),
        "hybrid_group": lambda: fully_shard(_seeded(), process_group=dist.group.WORLD, strategy="HYBRID_SHARD"),
        "no_shard_2d": lambda: fully_shard(_seeded(), device_mesh=_mesh(1, 2), strategy="NO_SHARD"),
        "no_torchrun": lambda: fully_shard(_seeded(), strategy=ShardingStrategy.HYBRID_SHARD),
        "not_a_mesh": lambda: fully_shard(_seeded(), device_mesh="cpu"),
    }
    return {name: error_text(fn, (ValueError, TypeError)) for name, fn in cases.items()}


def test_bad_meshes_raise_naming_the_argument(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    errors = run_ranks(bad_meshes, 2, timeout=120)[0]
    assert "process_group or device_mesh, not both" in errors["both"]
    assert "('replicate', 'shard')" in errors["names"] and "('dp', 'tp')" in errors["names"]
    assert "HYBRID_SHARD needs a 2-D device_mesh" in errors["hybrid_1d"]
    assert "not a process_group" in errors["hybrid_group"]
    assert "NO_SHARD replicates over every rank" in errors["no_shard_2d"]
    assert "LOCAL_WORLD_SIZE" in errors["no_torchrun"]
    assert "must be a torch DeviceMesh" in errors["not_a_mesh"]


def per_node_default(rank, world):
    model = fully_shard(_seeded(), strategy="HYBRID_SHARD", policy={Block})
    return fsdp_compile.explain(model)


def test_hybrid_without_a_mesh_shards_within_each_torchrun_node(monkeypatch):
    """FSDP1's default: LOCAL_WORLD_SIZE ranks per node shard, nodes replicate (here 2 "nodes" of
    2 ranks)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    text = run_ranks(per_node_default, 4, timeout=120)[3]
    assert "shard group: global ranks [2, 3]" in text
    assert "replicate group: global ranks [1, 3]" in text
