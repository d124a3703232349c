"""``fsdp_compile.estimate``: one compiled step simulated under torch's fake process group.

Checked against arithmetic where reality does not fit this machine (Llama-3 8B and 70B shapes
at worlds 8 to 1,024, 1-D, HSDP and dp x tp: sharded bytes, optimizer state, collective counts
and sizes, bytes sent, all from a closed form written here from the published shapes), against
reality where it fits (the README GPT on 2 gloo ranks, and under ``-m slow`` on 4, the 8 x 512
GPT and a tiny Llama on 2: each component within 10% of what the ranks measure), per-block
compile against the whole-model estimate, and for the rank-independence of the compiled
schedule (ranks 0 and 1,023 traced; a model whose forward branches on the rank is caught). The Llama tests trace 2 of the layers
(every layer has the same shapes; the closed form counts the layers it is given); the full
depths run under ``-m slow``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fsdp_compile
from fsdp_compile.estimate.models import LLAMA3_70B, LLAMA3_8B, Llama, LlamaConfig
from fsdp_compile.testing.spawn import run_ranks

# A per-block compiled step's transient peak over the whole model's, at most (and at least its
# inverse): the eager root is gathered again in backward, and the eager ops' tensors are held
# as Python holds them (estimated: 1.00 on the README GPT at world 2, 1.28 on the tiny Llama at
# world 8)
PER_BLOCK_PEAK_BOUND = 2.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLDS = (8, 64, 256, 1024)
CONFIGS = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}


COLWISE, ROWWISE = ("wq", "wk", "wv", "w1", "w3"), ("wo", "w2")  # the Llama TP plan


def llama_shapes(cfg: LlamaConfig, tp: int = 1) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parameter name -> (its unit, full shape), from the published hyperparameters; with
    ``tp``, the TP-local shape: column-wise layers keep 1/tp of dim 0, row-wise 1/tp of dim 1."""
    hd = cfg.dim // cfg.heads
    shapes = {"tok_embeddings.weight": ("", (cfg.vocab, cfg.dim))}
    for i in range(cfg.layers):
        unit = f"layers.{i}"
        for name, shape in (
            ("attention_norm.weight", (cfg.dim,)), ("wq.weight", (cfg.heads * hd, cfg.dim)),
            ("wk.weight", (cfg.kv_heads * hd, cfg.dim)), ("wv.weight", (cfg.kv_heads * hd, cfg.dim)),
            ("wo.weight", (cfg.dim, cfg.heads * hd)), ("ffn_norm.weight", (cfg.dim,)),
            ("w1.weight", (cfg.ffn, cfg.dim)), ("w2.weight", (cfg.dim, cfg.ffn)), ("w3.weight", (cfg.ffn, cfg.dim)),
        ):
            layer = name.split(".")[0]
            if layer in COLWISE:
                shape = (shape[0] // tp, shape[1])
            elif layer in ROWWISE:
                shape = (shape[0], shape[1] // tp)
            shapes[f"{unit}.{name}"] = (unit, shape)
    shapes["norm.weight"] = ("", (cfg.dim,))
    shapes["output.weight"] = ("", (cfg.vocab, cfg.dim))
    return shapes


def padded_numel(shape, world: int) -> int:
    """Elements every rank allocates: ceil(D / world) rows."""
    return -(-shape[0] // world) * math.prod(shape[1:])


def owned_numel(shape, world: int, rank: int) -> int:
    """Elements of rank's own rows [r*c, min((r+1)*c, D))."""
    c = -(-shape[0] // world)
    start = min(rank * c, shape[0])
    return (min(start + c, shape[0]) - start) * math.prod(shape[1:])


def closed_form(cfg: LlamaConfig, shard: int, replicas: int = 1, gather_bytes: int = 4, rank: int = 0, tp: int = 1):
    shapes = llama_shapes(cfg, tp)
    units = {}
    for unit, shape in shapes.values():
        units[unit] = units.get(unit, 0) + padded_numel(shape, shard)
    local = sum(units.values())
    owned = sum(owned_numel(s, shard, rank % shard) for _, s in shapes.values())
    gathers = [n * gather_bytes for n in units.values()]  # per-rank input of each unit's all-gather
    reduces = [n * shard * 4 for n in units.values()]  # float32 reduce-scatter input
    n_units = len(units)
    sent = (
        sum((shard - 1) * g for g in gathers)  # forward: every unit
        + sum((shard - 1) * g for u, g in zip(units, gathers) if u)  # backward: all but the kept root
        + sum((shard - 1) * r // shard for r in reduces)
    )
    if replicas > 1:
        sent += sum(2 * (replicas - 1) * (n * 4) // replicas for n in units.values())
    return dict(
        param_bytes=4 * local, grad_bytes=4 * local, optimizer_bytes=2 * 4 * owned + 4 * len(shapes),
        units=n_units, gathers=sorted(gathers), reduces=sorted(reduces), bytes_sent=sent,
        all_reduces=sorted(n * 4 for n in units.values()), shapes={k: list(s) for k, (_, s) in shapes.items()},
    )


def shallow(cfg: LlamaConfig, layers: int = 2):
    cfg = dataclasses.replace(cfg, layers=layers)
    return cfg, functools.partial(Llama, cfg)


# Each size and each world once in the default run; the rest of the sweep runs with the slow tests.
DEFAULT_SIZE_WORLDS = {("8b", 8), ("8b", 64), ("70b", 256), ("70b", 1024)}


@pytest.mark.parametrize("size,world", [
    pytest.param(size, world, marks=() if (size, world) in DEFAULT_SIZE_WORLDS else pytest.mark.slow, id=f"{size}-{world}")
    for size in CONFIGS for world in WORLDS
])
def test_llama_shards_and_collectives_equal_the_closed_form(size, world):
    cfg, factory = shallow(CONFIGS[size])
    est = fsdp_compile.estimate(factory, world, seq=16)
    want = closed_form(cfg, world)
    assert est.param_shapes == want["shapes"]
    assert est.units == want["units"] == cfg.layers + 1
    for key in ("0", "max"):
        got = est.ranks[key]
        assert (got.param_bytes, got.grad_bytes, got.optimizer_bytes, got.buffer_bytes) == (
            want["param_bytes"], want["grad_bytes"], want["optimizer_bytes"], 0
        )
        assert got.collectives_per_step == 3 * want["units"] - 1
        assert got.bytes_sent_per_step == want["bytes_sent"]
        assert got.peak_bytes > got.param_bytes + got.optimizer_bytes
    by = est.collectives["shard"]["by_kind"]
    assert by["forward:all_gather_into_tensor"]["count"] == want["units"]  # one per unit per direction
    assert by["backward:all_gather_into_tensor"]["count"] == want["units"] - 1  # the root stays gathered
    assert by["backward:reduce_scatter_tensor"]["count"] == want["units"]
    gathers = sorted(c["bytes"] for c in est.schedule if c["phase"] == "forward")
    reduces = sorted(c["bytes"] for c in est.schedule if c["kind"] == "reduce_scatter_tensor")
    assert gathers == want["gathers"] and reduces == want["reduces"]  # unit size over the group


# HSDP x TP in the default run (it covers more); 1-D x TP with the slow tests
@pytest.mark.parametrize("world,tp,mesh", [pytest.param(8, 2, None, marks=pytest.mark.slow), (64, 4, "4x4")])
def test_tensor_parallel_llama_shards_the_tp_local_tensors_over_dp(world, tp, mesh):
    """dp x tp: each block's q, k, v, w1, w3 column-wise and o, w2 row-wise over ``tp`` ranks,
    then every TP-local tensor sharded by FSDP over the dp ranks (``mesh``: HSDP over them)."""
    cfg, factory = shallow(LLAMA3_8B)
    est = fsdp_compile.estimate(factory, world, tp=tp, mesh=mesh, seq=16, trace_ranks=(0, world - 1))
    replicas, shard = (1, world // tp) if mesh is None else est.mesh
    want = closed_form(cfg, shard, replicas=replicas, tp=tp)
    assert est.tp == tp and est.param_shapes == want["shapes"]
    for key in ("0", str(world - 1), "max"):
        got = est.ranks[key]
        assert (got.param_bytes, got.grad_bytes, got.optimizer_bytes) == (
            want["param_bytes"], want["grad_bytes"], want["optimizer_bytes"]
        )
    gathers = sorted(c["bytes"] for c in est.schedule if c["kind"] == "all_gather_into_tensor" and c["phase"] == "forward")
    reduces = sorted(c["bytes"] for c in est.schedule if c["kind"] == "reduce_scatter_tensor")
    assert gathers == want["gathers"] and reduces == want["reduces"]
    dp_sent = sum(est.collectives[g]["sent"] for g in ("shard", "replicate") if g in est.collectives)
    assert dp_sent == want["bytes_sent"]
    assert est.collectives["tp"]["group_size"] == tp
    # per block: o and w2 all-reduce their output in forward, q/k/v/w1/w3 their input's
    # gradient in backward (one each)
    by = est.collectives["tp"]["by_kind"]
    assert by["forward:all_reduce"]["count"] == 2 * cfg.layers
    assert by["backward:all_reduce"]["count"] == 5 * cfg.layers
    assert est.schedules_equal


def test_uneven_and_empty_shards_at_world_1024():
    """Dim 0 of 1,000 over 1,024 ranks: one row each on ranks 0-999, none on 1,000-1,023; every
    rank allocates ceil(1000/1024) = 1 row. Llama's vocabulary of 128,256 rows: 126 per rank,
    rank 1,017 has 114 and ranks 1,018-1,023 none."""

    class Thin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.head = nn.Linear(8, 128256, bias=False)

        def forward(self, idx, targets):
            x = self.emb(idx)
            for layer in self.layers:
                x = layer(x)
            return self.head(x).float().pow(2).mean()

    est = fsdp_compile.estimate(Thin, 1024, seq=4, trace_ranks=(0, 1017, 1023))
    shapes = {"emb.weight": (1000, 8), "head.weight": (128256, 8), "layers.0.weight": (8, 8),
              "layers.0.bias": (8,), "layers.1.weight": (8, 8), "layers.1.bias": (8,)}
    allocated = 4 * sum(padded_numel(s, 1024) for s in shapes.values())
    assert allocated == 4 * (1 * 8 + 126 * 8 + 2 * (1 * 8 + 1))
    for rank in ("0", "1017", "1023"):
        owned = sum(owned_numel(s, 1024, int(rank)) for s in shapes.values())
        assert est.ranks[rank].param_bytes == allocated
        assert est.ranks[rank].param_bytes_owned == 4 * owned
        assert est.ranks[rank].optimizer_bytes == 2 * 4 * owned + 4 * len(shapes)
    assert est.ranks["1017"].param_bytes_owned == 4 * (0 + 114 * 8)  # rows 1000+ of emb: none
    assert est.ranks["1023"].param_bytes_owned == 0
    assert est.ranks["max"].optimizer_bytes == est.ranks["0"].optimizer_bytes
    assert est.schedules_equal and len(set(est.fingerprints.values())) == 1


def test_hybrid_mesh_8x32_shards_over_32_and_all_reduces_over_8():
    cfg, factory = shallow(LLAMA3_70B)
    est = fsdp_compile.estimate(factory, 256, mesh="8x32", bf16=True, activation_checkpointing=True, seq=16)
    want = closed_form(cfg, 32, replicas=8, gather_bytes=2, rank=0)
    got = est.ranks["0"]
    assert (got.param_bytes, got.grad_bytes, got.optimizer_bytes) == (
        want["param_bytes"], want["grad_bytes"], want["optimizer_bytes"]
    )
    assert est.mesh == (8, 32) and est.strategy == "HYBRID_SHARD"
    assert est.dtype == {"shards": "float32", "gather": "bfloat16", "reduce": "float32"}
    assert est.collectives["shard"]["group_size"] == 32 and est.collectives["replicate"]["group_size"] == 8
    assert est.collectives["replicate"]["count"] == want["units"]
    assert sorted(c["bytes"] for c in est.schedule if c["kind"] == "all_reduce") == want["all_reduces"]
    assert sorted(c["bytes"] for c in est.schedule if c["kind"] == "all_gather_into_tensor"
                  and c["phase"] == "forward") == want["gathers"]
    assert got.bytes_sent_per_step == want["bytes_sent"]


@pytest.mark.slow  # ~20 s each: the suite's budget
def test_activation_checkpointing_lowers_the_peak_and_keeps_one_gather_per_unit_and_direction():
    plain = fsdp_compile.estimate("readme-gpt", 8, batch=8)
    checkpointed = fsdp_compile.estimate("readme-gpt", 8, batch=8, activation_checkpointing=True)
    assert checkpointed.ranks["0"].step_peak_bytes < 0.8 * plain.ranks["0"].step_peak_bytes
    assert checkpointed.collectives == plain.collectives
    assert plain.ranks["0"].peak["phase"] in ("forward", "backward")


# Slow (four traces): the default run checks the per-block estimate against what gloo ranks
# measure (test_per_block_readme_gpt_...) and hybrid meshes whole-model (test_hybrid_mesh_8x32_...)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", [None, "2x4"])
def test_per_block_compile_estimates_the_same_shards_and_collectives_as_the_whole_model(mesh):
    """Every block compiled on its own (``block.compile(fullgraph=True)``), the root's
    embedding, head and loss eager: the same shards, optimizer state and collectives as the
    whole model compiled, except that the eager root is resharded after forward and gathered
    again in backward (the whole-model graph keeps it gathered): one more backward all-gather,
    of the root's size. Every rank compiles the same schedule."""
    kw = dict(seq=16, batch=2, mesh=mesh, trace_ranks=(0, 7))
    whole = fsdp_compile.estimate(tiny_llama, 8, **kw)
    blocks = fsdp_compile.estimate(tiny_llama, 8, compile="per-block", **kw)
    fields = ("param_bytes", "grad_bytes", "optimizer_bytes", "buffer_bytes", "param_bytes_owned")
    for key in ("0", "7", "max"):
        assert [getattr(blocks.ranks[key], f) for f in fields] == [getattr(whole.ranks[key], f) for f in fields]
    assert blocks.collectives.keys() == whole.collectives.keys()
    for group, want in whole.collectives.items():
        got = blocks.collectives[group]
        if group != "shard":
            assert got == want
            continue
        forward, backward = "forward:all_gather_into_tensor", "backward:all_gather_into_tensor"
        assert {k: v for k, v in got["by_kind"].items() if k != backward} == {
            k: v for k, v in want["by_kind"].items() if k != backward}
        assert got["by_kind"][backward] == got["by_kind"][forward]  # every unit, the root too
        root = want["by_kind"][forward]["bytes"] - want["by_kind"][backward]["bytes"]
        assert got["by_kind"][backward]["bytes"] == want["by_kind"][backward]["bytes"] + root
        assert got["count"] == want["count"] + 1 and got["bytes"] == want["bytes"] + root
    assert blocks.schedules_equal and blocks.fingerprints["0"] == blocks.fingerprints["7"]
    assert blocks.fingerprints["0"] != whole.fingerprints["0"]
    # the transient peak: PEAK_BOUND of the whole model's, measured (README "Will it fit?")
    ratio = blocks.ranks["0"].step_peak_bytes / whole.ranks["0"].step_peak_bytes
    assert 1 / PER_BLOCK_PEAK_BOUND <= ratio <= PER_BLOCK_PEAK_BOUND, ratio


class RankBranching(nn.Module):
    """Rank 0 runs both blocks, every other rank only the first: a rank-dependent schedule."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, idx, targets):
        x = self.emb(idx)
        for i, layer in enumerate(self.layers):
            if i == 0 or dist.get_rank() == 0:
                x = layer(x)
        return x.float().pow(2).mean()


def test_every_rank_plans_the_same_schedule_and_a_rank_dependent_one_is_caught():
    _, factory = shallow(LLAMA3_8B, layers=1)
    same = fsdp_compile.estimate(factory, 1024, seq=8, trace_ranks=(0, 1023))
    assert same.schedules_equal and same.fingerprints["0"] == same.fingerprints["1023"]
    branching = fsdp_compile.estimate(RankBranching, 1024, seq=4, trace_ranks=(0, 1023))
    assert not branching.schedules_equal
    assert branching.fingerprints["0"] != branching.fingerprints["1023"]
    assert not dist.is_initialized()  # the fake group is gone


def test_estimate_is_the_exported_function_and_refuses_an_existing_process_group():
    assert "estimate" in fsdp_compile.__all__ and callable(fsdp_compile.estimate)
    assert fsdp_compile.estimate is sys.modules["fsdp_compile.estimate"].estimate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(RuntimeError, match="already has one"):
            fsdp_compile.estimate("readme-gpt", 2)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="mesh 3x4 has 12 ranks"):
        fsdp_compile.estimate("readme-gpt", 16, mesh="3x4")
    with pytest.raises(ValueError, match="unknown model"):
        fsdp_compile.estimate("gpt-17", 2)
    with pytest.raises(ValueError, match="tp=3 must be >= 1 and divide world_size=8"):
        fsdp_compile.estimate("readme-gpt", 8, tp=3)
    with pytest.raises(ValueError, match="compile='blocks'; use 'model' or 'per-block'"):
        fsdp_compile.estimate("readme-gpt", 2, compile="blocks")
    with pytest.raises(ValueError, match="GPT has none"):
        fsdp_compile.estimate("readme-gpt", 4, tp=2)
    assert not dist.is_initialized()


def gpt_8x512():
    from fsdp_compile.testing.gpt import GPT, GPT_8X512

    return GPT(GPT_8X512)


TINY_LLAMA = LlamaConfig(dim=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, max_seq=32)


def tiny_llama():
    return Llama(TINY_LLAMA)


# name -> (factory, its unit class, sequences per rank, tokens per sequence)
REAL_MODELS = {
    "readme-gpt": ("readme-gpt", "gpt", 4, 32),
    "gpt-8x512": (gpt_8x512, "gpt", 2, 128),
    "tiny-llama": (tiny_llama, "llama", 2, 32),
}


def measure(rank: int, world: int, name: str, per_block: bool = False) -> dict:
    """One rank's bytes, as benchmarks/memory_peak.py measures them: tensors held between
    steps, and the peak growth of a profiled step (after two warm-up steps). The peak is the
    least of three profiled steps: a collective's buffers are freed by whichever thread drops
    them last, gloo's worker (after the wait: the profiler does not see that free unless the
    address is allocated again, ``profile_step``) or the main thread, so a step's measured
    peak moves with thread timing (a 33.8 MB gather of the 8 x 512 GPT's root, counted into the
    backward); the least is the schedule the estimate models, buffers freed when their wait ends.
    ``per_block``: every block compiled on its own, the rest eager (as torchtitan compiles)."""
    import gc

    from fsdp_compile.estimate.models import NAMED, LlamaBlock
    from fsdp_compile.testing.gpt import Block
    from fsdp_compile.testing.memory import profile_step

    factory, family, batch, seq = REAL_MODELS[name]
    factory = NAMED.get(factory, factory)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = Block if family == "gpt" else LlamaBlock
    model = fsdp_compile.fully_shard(factory(), policy={block})
    if per_block:
        for m in model.modules():
            if isinstance(m, block):
                m.compile(backend="fsdp_compile", fullgraph=True)
        compiled = model
    else:
        compiled = torch.compile(model, backend="fsdp_compile")
    vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = {}

    def step(i):
        g = torch.Generator().manual_seed(1000 * i + rank)
        idx = torch.randint(0, vocab, (batch, seq), generator=g)
        compiled(idx, torch.roll(idx, -1, dims=1)).backward()
        grads.clear()  # this step's gradients
        grads.update({p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                      for p in model.parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    gc.collect()
    peak = min(profile_step(lambda: step(i))[0] for i in range(2, 5))
    units = fsdp_compile.sharding_info(model).units
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    return dict(param_bytes=sum(u.local_flat.untyped_storage().nbytes() for u in units),
                grad_bytes=sum(grads.values()), optimizer_bytes=sum(state.values()),
                buffer_bytes=sum(b.untyped_storage().nbytes() for b in model.buffers()), step_peak_bytes=peak)


def check_against_reality(name: str, world: int, per_block: bool = False, peak_tolerance: float = 0.10) -> None:
    """Every reported component within 10% of what ``world`` gloo ranks measure (the step peak
    within ``peak_tolerance``)."""
    factory, _, batch, seq = REAL_MODELS[name]
    est = fsdp_compile.estimate(factory, world, batch=batch, seq=seq, backend="gloo", trace_ranks=tuple(range(world)),
                                compile="per-block" if per_block else "model")
    measured = run_ranks(measure, world, name, per_block, timeout=1800)
    assert len(measured) == world
    for rank, real in enumerate(measured):
        got = est.ranks[str(rank)]
        for field, value in real.items():
            tolerance = peak_tolerance if field == "step_peak_bytes" else 0.10
            assert abs(getattr(got, field) - value) <= tolerance * value, (rank, field, getattr(got, field), value)


def test_per_block_readme_gpt_on_two_gloo_ranks_within_10_percent_of_what_they_measure():
    """Every block compiled on its own, the root eager: each block's graph returns its gathered
    parameters, which its post-forward hook drops (the estimate counted them as saved for
    backward: +28%)."""
    check_against_reality("readme-gpt", 2, per_block=True)


@pytest.mark.slow  # the whole model compiled by Inductor, ~20 s; the suite measures per-block
def test_readme_gpt_on_two_gloo_ranks_within_10_percent_of_what_they_measure():
    check_against_reality("readme-gpt", 2)


@pytest.mark.slow  # a few minutes each: the suite's budget
@pytest.mark.parametrize("name,world,peak_tolerance", [
    ("readme-gpt", 4, 0.10),
    ("gpt-8x512", 2, 0.10),
    ("tiny-llama", 2, 0.10),
])
def test_estimate_within_10_percent_of_what_gloo_ranks_measure(name, world, peak_tolerance):
    check_against_reality(name, world, peak_tolerance=peak_tolerance)


@pytest.mark.slow  # ~20 s each: the suite's budget
def test_cli_writes_the_json_and_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "est.json", tmp_path / "est.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fsdp_compile.estimate", "--model", "readme-gpt", "--world-size", "4",
         "--mesh", "2x2", "--bf16", "--batch", "2", "--seq", "16", "--json", str(out), "--plot", str(png)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"param_shapes", "units", "ranks"} <= set(data)
    for key in ("0", "max"):
        assert {"param_bytes", "grad_bytes", "optimizer_bytes", "buffer_bytes", "peak_bytes",
                "collectives_per_step", "bytes_sent_per_step"} <= set(data["ranks"][key])
    assert data["param_shapes"]["tok_emb.weight"] == [96, 64] and data["units"] == 9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "peak_bytes" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("size", CONFIGS)
def test_full_depth_llama_at_world_1024_matches_the_closed_form(size, record_property):
    """The published depth at world 1,024. Its wall time is recorded (``record_property``), not
    asserted tightly: a time is a benchmark's claim; the bound below only stops a runaway trace."""
    cfg = CONFIGS[size]
    start = time.perf_counter()
    est = fsdp_compile.estimate(f"llama3-{size}", 1024, bf16=True, activation_checkpointing=True)
    seconds = time.perf_counter() - start
    want = closed_form(cfg, 1024, gather_bytes=2)
    got = est.ranks["0"]
    assert (got.param_bytes, got.optimizer_bytes, got.bytes_sent_per_step) == (
        want["param_bytes"], want["optimizer_bytes"], want["bytes_sent"]
    )
    assert est.units == cfg.layers + 1 and got.collectives_per_step == 3 * est.units - 1
    record_property("seconds", round(seconds, 1))
    assert seconds <= 900, f"{size} at world 1024 took {seconds:.0f} s"
