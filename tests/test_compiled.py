"""The compiled path on 2 gloo ranks: graph counts, collective structure per strategy, and
parity with the eager ``fully_shard`` run and with DDP (the independent reference).

One spawn per strategy trains: DDP, eager and compiled (``aot_eager``) float64, a hand-written
bf16 reference, eager and compiled bf16, and for FULL_SHARD also Inductor float64 and bf16 (the
README GPT, 10 AdamW steps, three parameter groups, new data every step) and returns numbers;
the assertions run here in the parent.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fsdp_compile
from fsdp_compile.testing.graphs import REDUCE_SCATTER, graph_structure
from fsdp_compile.testing.gpt import GPT, Block, GPTConfig, gpt_batch, param_groups
from fsdp_compile.testing.reference import FLOAT64_ROUNDING, manual_mixed_precision
from fsdp_compile.testing.spawn import error_text, run_ranks

STEPS = 5  # AdamW steps of every run: the first compiles, the rest reuse its graphs
# aot_eager runs eager's ops on the same inputs in the same order: its float32 numbers are eager's.
EXACT = dict(rtol=0, atol=0)
BF16 = fsdp_compile.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _train(model, forward, rank, steps=STEPS):
    opt = torch.optim.AdamW(param_groups(model), lr=3e-3)
    losses = []
    for step in range(steps):
        idx, targets = gpt_batch(step, rank)
        loss = forward(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0:
            torch._dynamo.config.error_on_recompile = True  # steps 1.. must reuse the graphs
    torch._dynamo.config.error_on_recompile = False
    return losses


def _run_variant(base, rank, strategy, mp, backend, dtype, steps=STEPS):
    model = fsdp_compile.fully_shard(
        copy.deepcopy(base).to(dtype), policy={Block}, strategy=strategy, mixed_precision=mp
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    forward = model if backend is None else torch.compile(model, backend=backend, fullgraph=True)
    out = {"losses": _train(model, forward, rank, steps), "params": fsdp_compile.full_state_dict(model)}
    if backend is not None:
        graphs = fsdp_compile.sharding_info(model).compiled_graphs
        out["graphs"] = {
            "count": len(graphs),
            "units": len(fsdp_compile.sharding_info(model).units),
            "unit_names": [u.name for u in fsdp_compile.sharding_info(model).units],
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            **graph_structure(graphs[0]),
            "facts": _decomposed_graph_facts(model),
        }
    return out


def strategy_run(rank: int, world: int, strategy: str) -> dict:
    """DDP, eager and compiled training of the same GPT. Full precision runs in float64, where
    eager equals DDP and compiled (``aot_eager``, and Inductor for FULL_SHARD) equals both to
    rounding. Mixed precision runs bf16 compute on fp32 shards, against a hand-written bf16
    reference (``manual_mixed_precision``: plain autograd and ``all_reduce``)."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(layers=LAYERS[strategy]))
    ddp = DDP(copy.deepcopy(base).to(torch.float64))
    out = {"ddp": {"losses": _train(ddp, ddp, rank), "params": ddp.module.state_dict()}}
    master = copy.deepcopy(base)
    losses, _ = manual_mixed_precision(master, _bf16_reference_groups, lambda step: [gpt_batch(step, rank)], STEPS)
    out["reference_bf16"] = {"losses": losses.tolist(), "params": master.state_dict()}  # with the tied head
    inductor, aot_eager = "fsdp_compile", fsdp_compile.backend(inner="aot_eager")
    variants = {
        "eager": (None, None, torch.float64),
        "compiled": (None, aot_eager, torch.float64),
        "eager_bf16": (BF16, None, torch.float32),
        "compiled_bf16": (BF16, aot_eager, torch.float32),
    }
    if strategy == INDUCTOR_STRATEGY:
        variants["inductor"] = (None, inductor, torch.float64)
        variants["inductor_bf16"] = (BF16, inductor, torch.float32)
    for name, (mp, backend, dtype) in variants.items():
        out[name] = _run_variant(base, rank, strategy, mp, backend, dtype)
    return out


def _bf16_reference_groups(model):
    """``_train``'s optimizer groups for ``manual_mixed_precision`` (which builds AdamW with the
    defaults): the third group at ``_train``'s lr."""
    weights, biases, rest = param_groups(model)
    return [weights, biases, {**rest, "lr": 3e-3}]


# 2 layers, the README GPT's width (its 8 layers are trained compiled in test_long_run, 32 blocks
# in test_regional_compile): the root and two blocks, so block 0 runs between two units and the
# root's head after the last block. Every compile traces and compiles each layer. Inductor
# compiles FULL_SHARD only.
LAYERS = {"FULL_SHARD": 2, "SHARD_GRAD_OP": 2, "NO_SHARD": 2}
INDUCTOR_STRATEGY = "FULL_SHARD"

EXPECTED = {
    # forward collectives, backward collectives (per unit), whose gathered params are saved for
    # backward. FULL_SHARD keeps the root unit gathered from forward to backward (as FSDP2 does;
    # backend(keep_root_gathered=True)): the blocks are gathered again, the root is not.
    "FULL_SHARD": ({"all_gather_into_tensor": 1}, {"all_gather_into_tensor": 1, REDUCE_SCATTER: 1}, "root"),
    "SHARD_GRAD_OP": ({"all_gather_into_tensor": 1}, {REDUCE_SCATTER: 1}, "all"),
    "NO_SHARD": ({}, {"all_reduce": 1}, "none"),
}


def _assert_structure(g, strategy, what):
    fwd, bwd, saved = EXPECTED[strategy]
    units = g["units"]
    assert g["forward"] == {k: v * units for k, v in fwd.items()}, what
    backward = {k: v * units for k, v in bwd.items()}
    if saved == "root":
        backward["all_gather_into_tensor"] -= 1  # not the root's
    assert g["backward"] == backward, what
    names = {"root": [""], "all": sorted(g["unit_names"]), "none": []}[saved]
    assert g["saved_units"] == names, what


@pytest.fixture(
    scope="module",
    params=[pytest.param(s, marks=pytest.mark.inductor) if s == INDUCTOR_STRATEGY else s for s in EXPECTED],
)
def strategy_results(request):
    return request.param, run_ranks(strategy_run, 2, request.param, timeout=900)


def _compiled_variants(res):
    return [name for name in res if "graphs" in res[name]]


def test_one_forward_and_one_backward_graph_no_breaks_no_recompiles(strategy_results):
    _, results = strategy_results
    for res in results:
        assert "compiled" in _compiled_variants(res)
        for name in _compiled_variants(res):
            g = res[name]["graphs"]
            assert (g["count"], g["unique_graphs"], g["graph_breaks"]) == (1, 1, 0), name


def test_collectives_per_unit_in_each_graph(strategy_results):
    strategy, results = strategy_results
    for res in results:
        for name in _compiled_variants(res):
            g = res[name]["graphs"]
            assert g["units"] == LAYERS[strategy] + 1  # the blocks + the root
            _assert_structure(g, strategy, name)


# Inductor's float64 losses differ from eager's by float32-sized rounding (about 1e-7 relative, one
# or two float32 ulps of a loss near 4.6) while its parameters equal DDP's to float64 rounding.
INDUCTOR_FLOAT64_LOSS = dict(rtol=1e-6, atol=0)


def _assert_same_run(run, reference, loss_tol=None, **tol):
    torch.testing.assert_close(run["losses"], reference["losses"], **(tol if loss_tol is None else loss_tol))
    assert run["params"].keys() == reference["params"].keys()
    for key, value in reference["params"].items():
        torch.testing.assert_close(run["params"][key], value, **tol, msg=lambda m: f"{key}: {m}")


def test_compiled_matches_eager_and_ddp(strategy_results):
    _, results = strategy_results
    for res in results:
        _assert_same_run(res["eager"], res["ddp"], rtol=0, atol=0)  # the eager path is DDP's
        _assert_same_run(res["compiled"], res["ddp"], **FLOAT64_ROUNDING)
        if "inductor" in res:
            _assert_same_run(res["inductor"], res["ddp"], INDUCTOR_FLOAT64_LOSS, **FLOAT64_ROUNDING)


def test_compiled_mixed_precision_matches_a_hand_written_bf16_reference(strategy_results):
    _, results = strategy_results
    for res in results:
        reference = res["reference_bf16"]
        assert reference["losses"] != res["eager"]["losses"]  # bf16 compute happened
        assert all(v.dtype == torch.float32 for v in res["eager_bf16"]["params"].values())
        _assert_same_run(res["eager_bf16"], reference, rtol=0, atol=0)
        # aot_eager runs eager's bf16 ops: the graph transformation (collectives, casts,
        # reshard) changes no number.
        _assert_same_run(res["compiled_bf16"], reference, rtol=0, atol=0)
        if "inductor_bf16" in res:
            # Inductor's own bf16 kernels round differently from eager's: losses agree to bf16
            # precision (the parameters drift further through Adam, as for any compiled model).
            torch.testing.assert_close(
                res["inductor_bf16"]["losses"], reference["losses"], rtol=1.6e-2, atol=1e-5
            )


@fsdp_compile.sharded(policy={Block}, strategy="FULL_SHARD")
class ShardedGPT(GPT):
    """The README GPT, sharded by the class decorator at the end of __init__."""


SMALL = GPTConfig(layers=2)


def decorator_and_explain_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    decorated = ShardedGPT(SMALL)
    torch.manual_seed(0)
    ddp = DDP(GPT(SMALL))
    compiled = torch.compile(decorated, backend=fsdp_compile.backend(inner="aot_eager"), fullgraph=True)
    out = {
        "ddp": _train(ddp, ddp, rank, steps=4),
        "decorated": _train(decorated, compiled, rank, steps=4),
        "names": [n for n, _ in decorated.named_parameters()],
        "plain_names": [n for n, _ in ddp.module.named_parameters()],
        "explain": fsdp_compile.explain(compiled),
    }
    from fsdp_compile.consistency import verify_schedule_across_ranks
    from fsdp_compile.passes.schedule_check import Collective

    mine = [Collective("all_gather_into_tensor", 64 * (rank + 1), "float32")]
    try:
        verify_schedule_across_ranks(mine, torch.distributed.group.WORLD, "forward")
    except RuntimeError as error:
        out["mismatch"] = str(error)
    return out


def test_decorated_class_compiles_and_trains_like_ddp_and_explain_lists_collectives():
    for res in run_ranks(decorator_and_explain_run, 2, timeout=600):
        assert res["names"] == res["plain_names"]
        torch.testing.assert_close(res["decorated"], res["ddp"], **EXACT)
        text = res["explain"]
        assert "3 units" in text and "unit 'blocks.0'" in text and "FULL_SHARD" in text
        # backward: the two blocks gathered again, the root kept gathered since forward
        assert "forward: 3 collectives" in text and "backward: 5 collectives" in text
        assert "kept gathered from forward to backward (not gathered again): '<root>'" in text
        assert text.count("all_gather_into_tensor") == 5 and text.count(REDUCE_SCATTER) == 3
        assert text.count("(the reduce-scatter: gloo has none") == 3  # says what the all-to-all is
        assert "on shard group" in text and "replicate" not in text
        assert "rank 1's issues" in res["mismatch"] or "rank 0's issues" in res["mismatch"]


def bucketing_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    base = GPT(SMALL)
    eager = fsdp_compile.fully_shard(copy.deepcopy(base), policy={Block})
    model = fsdp_compile.fully_shard(copy.deepcopy(base), policy={Block})
    backend = fsdp_compile.backend(inner="aot_eager", bucket_bytes=64 << 20, prefetch=2)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    record = None
    out = {"eager": _train(eager, eager, rank, steps=4), "bucketed": _train(model, compiled, rank, steps=4)}
    record = fsdp_compile.sharding_info(model).compiled_graphs[0]
    out["buckets"] = [len(b) for b in record.buckets]
    out["schedules"] = {k: [c.kind for c in v] for k, v in record.schedules.items()}
    out["params"] = (fsdp_compile.full_state_dict(eager), fsdp_compile.full_state_dict(model))
    return out


def test_bucketing_merges_all_units_into_one_collective_and_keeps_parity():
    for res in run_ranks(bucketing_run, 2, timeout=600):
        assert res["buckets"] == [3]  # the root and both blocks: adjacent, same strategy
        assert res["schedules"] == {
            "forward": ["all_gather_into_tensor"],
            "backward": ["all_gather_into_tensor", REDUCE_SCATTER],
        }
        torch.testing.assert_close(res["bucketed"], res["eager"], **EXACT)
        for key, value in res["params"][0].items():
            torch.testing.assert_close(res["params"][1][key], value, **EXACT)


# Steps of the traced-copies run with Triton launches: the first compiles, the next two reuse
# the graphs (no recompile) on parameters AdamW has moved.
TRITON_STEPS = 3


def traced_copies_run(rank: int, world: int, lowering: str, strategy: str) -> dict:
    """Compiled training with every copy traced the way CUDA graphs hold it, without our copy
    ops: the passes must find the gather chains from the collectives. ``strategy``: FULL_SHARD
    (Inductor for ``"aten"``) or SHARD_GRAD_OP.

    - ``"aten"``: every copy decomposed into ATen ops (pad, cat, slicing).
    - ``"triton"``: every copy one ``wrap_triton`` launch of ``triton_traced``'s kernels, exactly
      the graph CUDA gets (Triton's TTIR analysis runs for a sm_80 target); the launches then run
      in Triton's interpreter on the CPU tensors. Inductor cannot compile a Triton launch for CPU
      tensors, so this lowering uses the ``aot_eager`` inner compiler. The interpreter runs
      each launch's programs one by one in Python (most of this test's time), so this lowering
      trains ``TRITON_STEPS``: every step runs every copy, and the losses and the final
      parameters must equal the eager run's.
    """
    import contextlib

    from fsdp_compile.testing.triton_on_cpu import compiling_for_cuda, triton_launches_interpreted

    aot_eager = fsdp_compile.backend(inner="aot_eager", copies=lowering)
    inductor = fsdp_compile.backend(copies=lowering)
    backend = inductor if (lowering, strategy) == ("aten", "FULL_SHARD") else aot_eager
    torch.manual_seed(0)
    base = GPT(SMALL)
    with contextlib.ExitStack() as stack:
        if lowering == "triton":
            stack.enter_context(compiling_for_cuda())
            stack.enter_context(triton_launches_interpreted())
        steps = TRITON_STEPS if lowering == "triton" else STEPS
        eager = _run_variant(base, rank, strategy, None, None, torch.float64, steps)
        compiled = _run_variant(base, rank, strategy, None, backend, torch.float64, steps)
    return {"eager": eager, "compiled": compiled, "graphs": compiled.pop("graphs")}


def _decomposed_graph_facts(model) -> dict:
    record = fsdp_compile.sharding_info(model).compiled_graphs[0]
    facts = {}
    for name in ("forward", "backward"):
        nodes = [n for n in getattr(record, name).graph.nodes if n.op == "call_function"]
        gathers = [i for i, n in enumerate(nodes) if "all_gather_into_tensor" in str(n.target)]
        compute = [i for i, n in enumerate(nodes) if "recompute" not in n.meta and "mm" in str(n.target)]
        facts[name] = {
            "fsdp_ops": sorted({str(n.target) for n in nodes if "fsdp_compile" in str(n.target)}),
            "gathers_before_compute": sum(i < compute[0] for i in gathers) if compute else None,
            "launches": sum("triton_kernel_wrapper_functional" in str(n.target) for n in nodes),
        }
    return facts


# aten: FULL_SHARD compiled by Inductor; triton: most of its time in Triton's interpreter.
# SHARD_GRAD_OP (aot_eager) under the slow marker: its graphs are FULL_SHARD's without the
# backward regather.
@pytest.mark.parametrize("lowering,strategy", [
    pytest.param("aten", "FULL_SHARD", marks=pytest.mark.inductor),
    ("triton", "FULL_SHARD"),
    pytest.param("aten", "SHARD_GRAD_OP", marks=pytest.mark.slow),
    pytest.param("triton", "SHARD_GRAD_OP", marks=pytest.mark.slow),
])
def test_traced_copies_keep_structure_prefetch_and_parity(lowering, strategy):
    inductor = (lowering, strategy) == ("aten", "FULL_SHARD")  # traced_copies_run's backend
    for run in run_ranks(traced_copies_run, 2, lowering, strategy, timeout=900):
        g = run["graphs"]
        _assert_structure(g, strategy, strategy)
        assert g["facts"]["forward"]["fsdp_ops"] == [] and g["facts"]["backward"]["fsdp_ops"] == []
        if lowering == "triton":
            # Per unit: copy-in and copy-out in the forward (FULL_SHARD adds the regather's
            # copy-in/out and the gradient copy-in/out in the backward).
            assert g["facts"]["forward"]["launches"] == 2 * g["units"], g["facts"]
        # Before block 0's first matmul: the root's and block 0's gathers, plus block 1's,
        # moved there by prefetch=1 (without the move it would come after that matmul).
        assert g["facts"]["forward"]["gathers_before_compute"] == 3, g["facts"]
        _assert_same_run(run["compiled"], run["eager"], INDUCTOR_FLOAT64_LOSS if inductor else None, **FLOAT64_ROUNDING)


class _BreakingBlock(torch.nn.Module):
    """Reads a parameter of its unit on both sides of a graph break."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x) + self.a.bias


def graph_break_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    base = torch.nn.Sequential(_BreakingBlock(), _BreakingBlock())
    out = {}
    for name in ("eager", "compiled"):
        model = fsdp_compile.fully_shard(copy.deepcopy(base).double(), policy={_BreakingBlock})
        torch._dynamo.reset()
        forward = model if name == "eager" else torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(4):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank), dtype=torch.float64)
            loss = forward(x).pow(2).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[name] = {"losses": losses, "params": fsdp_compile.full_state_dict(model)}
        if name == "compiled":
            out["graphs"] = len(fsdp_compile.sharding_info(model).compiled_graphs)
    return out


def test_graph_breaks_inside_units_keep_the_eager_numbers():
    """A graph break in every block's forward (compiled without fullgraph): each piece is its own
    graph, a unit's parameters are read in two of them, and training matches eager."""
    for res in run_ranks(graph_break_run, 2, timeout=600):
        assert res["graphs"] >= 3  # the pieces between the breaks
        _assert_same_run(res["compiled"], res["eager"], **FLOAT64_ROUNDING)


def frozen_on_one_rank(rank: int, world: int) -> str:
    """Rank 1 freezes block 0 after fully_shard: the forward graphs are the same, the backward
    graphs are not (rank 1 does not reduce block 0's gradients)."""
    torch.manual_seed(0)
    model = fsdp_compile.fully_shard(GPT(SMALL), policy={Block})
    if rank == 1:
        model.blocks[0].requires_grad_(False)
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"), fullgraph=True)
    return error_text(lambda: compiled(*gpt_batch(0, rank, SMALL)).backward())


def test_ranks_with_different_backward_graphs_fail_before_the_backward_runs():
    for message in run_ranks(frozen_on_one_rank, 2, timeout=180):
        assert "compiled forward+backward (joint) graph" in message and REDUCE_SCATTER in message, message


class GathersActivations(torch.nn.Module):
    """A user's own all-gather (of activations) next to the units' gathers."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        from torch.distributed import _functional_collectives as funcol

        h = funcol.all_gather_tensor(self.fc(x), 0, torch.distributed.group.WORLD)
        return h.square().mean()


def foreign_collectives_and_backends(rank: int, world: int) -> dict:
    import warnings

    from fsdp_compile.passes.reshard import _AC_GRAPH_ID

    out = {}
    torch.manual_seed(0)
    base = GathersActivations()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(rank))
    eager = fsdp_compile.fully_shard(copy.deepcopy(base), policy={torch.nn.Linear})
    model = fsdp_compile.fully_shard(copy.deepcopy(base), policy={torch.nn.Linear})
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager", prefetch=2), fullgraph=True)
    out["losses"] = (compiled(x).item(), eager(x).item())
    record = fsdp_compile.sharding_info(model).compiled_graphs[0]
    gathers = [n for n in record.forward.graph.nodes if str(n.target) == "_c10d_functional.all_gather_into_tensor.default"]
    out["ours_tagged"] = [n.meta.get("ac_graph_id") == _AC_GRAPH_ID for n in gathers]
    # Another backend: the markers survive and run one gather per read, with one warning.
    other = fsdp_compile.fully_shard(copy.deepcopy(base), policy={torch.nn.Linear})
    plain = torch.compile(other, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["other_backend"] = (plain(x).item(), plain(x).item())
    out["warnings"] = [str(w.message) for w in caught if "fsdp_compile" in str(w.message)]
    return out


def test_passes_leave_a_users_collectives_alone_and_other_backends_warn_once():
    for got in run_ranks(foreign_collectives_and_backends, 2, timeout=300):
        torch.testing.assert_close(got["losses"][0], got["losses"][1], **EXACT)
        # The unit's gather is tagged (FULL_SHARD: recomputed); the user's all-gather is not.
        assert sorted(got["ours_tagged"]) == [False, True], got["ours_tagged"]
        torch.testing.assert_close(got["other_backend"][0], got["losses"][1], **EXACT)
        assert len(got["warnings"]) == 1 and "backend='fsdp_compile'" in got["warnings"][0]


def inductor_options_seen(rank: int, world: int) -> dict:
    """Which ``reorder_for_peak_memory`` Inductor compiled each graph with, by backend options."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor_config

    inner = compile_fx.compile_fx_inner
    seen = []

    def spy(graph, inputs, **kwargs):
        seen.append(("backward" if kwargs.get("is_backward") else "forward", inductor_config.reorder_for_peak_memory))
        return inner(graph, inputs, **kwargs)

    compile_fx.compile_fx_inner = spy  # what compiler._compile_inner calls
    out, losses = {}, []
    try:
        for name, options in (("default", None), ("override", {"reorder_for_peak_memory": True})):
            torch._dynamo.reset()
            seen.clear()
            torch.manual_seed(0)
            model = fsdp_compile.fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)))
            compiled = torch.compile(model, backend=fsdp_compile.backend(inductor_options=options), fullgraph=True)
            loss = compiled(torch.ones(2, 8)).sum()
            loss.backward()
            losses.append(loss.item())
            out[name] = list(seen)
    finally:
        compile_fx.compile_fx_inner = inner
    out["losses"] = losses
    return out


@pytest.mark.inductor
def test_inductor_compiles_both_graphs_with_our_defaults_unless_overridden():
    """Inductor's peak-memory reordering is off in the forward and in the backward (compiled
    lazily, outside the backend call): it would move the waits our passes place. A user's
    ``inductor_options`` entry wins."""
    assert fsdp_compile.backend().inductor_options == {"reorder_for_peak_memory": False}
    for got in run_ranks(inductor_options_seen, 2, timeout=600):
        assert got["default"] == [("forward", False), ("backward", False)], got
        assert got["override"] == [("forward", True), ("backward", True)], got
        assert got["losses"][0] == got["losses"][1]


def _reduction_waits(record) -> tuple[list[int], list[int], list[int]]:
    """Positions in the backward graph of the reductions, their waits and the matmuls."""
    nodes = list(record.backward.graph.nodes)
    reductions = [i for i, n in enumerate(nodes) if str(n.target) == f"_c10d_functional.{REDUCE_SCATTER}.default"]
    waits = [i for i, n in enumerate(nodes) if str(n.target) == "_c10d_functional.wait_tensor.default"
             and str(n.args[0].target) == f"_c10d_functional.{REDUCE_SCATTER}.default"]
    mms = [i for i, n in enumerate(nodes) if str(n.target).startswith("aten.mm")]
    return reductions, waits, mms


def overlapped_reductions_run(rank: int, world: int) -> dict:
    """Three AdamW steps of a 2-block GPT: eager, compiled with the default backend options
    (``overlap_reductions=True``) and compiled with ``overlap_reductions=False``."""
    out = {}
    for name, options in (("eager", None), ("default", {}), ("no_overlap", {"overlap_reductions": False})):
        torch.manual_seed(0)
        model = fsdp_compile.fully_shard(GPT(GPTConfig(layers=2)), policy={Block})
        forward = model
        if options is not None:
            forward = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager", **options), fullgraph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            loss = forward(*gpt_batch(step, rank))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[name] = losses
        if options is None:
            continue
        reductions, waits, mms = _reduction_waits(fsdp_compile.sharding_info(model).compiled_graphs[0])
        # units: block 1, block 0, root (three reductions, each with its wait)
        assert len(reductions) == len(waits) == 3, (name, reductions, waits)
        # deferred: each reduction is waited for just before the next one is issued, block 1's
        # only after block 0's backward matmuls; not deferred: right after its issue
        out[f"{name}_deferred"] = (
            all(r < w < r_next for r, w, r_next in zip(reductions, waits, reductions[1:]))
            and any(reductions[0] < m < waits[0] for m in mms)
        )
        out[f"{name}_waited_at_once"] = not any(r < m < w for r, w in zip(reductions, waits) for m in mms)
    return out


def test_reductions_overlap_the_next_units_backward_by_default_and_train_like_eager():
    for got in run_ranks(overlapped_reductions_run, 2, timeout=300):
        assert got["default"] == got["eager"], got  # aot_eager runs eager's ops: exact
        assert got["no_overlap"] == got["eager"], got
        assert got["default_deferred"] and not got["default_waited_at_once"], got
        assert got["no_overlap_waited_at_once"] and not got["no_overlap_deferred"], got


def _compiled_model_lifetime_rank(rank, world) -> dict:
    """A compiled (``aot_eager``, bucketed) model trained one step, then deleted: whether its
    ``FSDPState``, its units and the global optimizer hook outlive it after ``gc.collect()``
    (Dynamo's code cache keeps the compiled graphs until ``torch._dynamo.reset()``)."""
    import gc
    import weakref

    from fsdp_compile.registry import live_units
    from fsdp_compile.state_dict import _live_hooks

    torch.manual_seed(0)
    model = fsdp_compile.fully_shard(GPT(GPTConfig(layers=2)), policy={Block})
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager", bucket_bytes=1 << 30))
    opt = torch.optim.AdamW(model.parameters())
    compiled(*gpt_batch(0, rank)).backward()
    opt.step()
    state = weakref.ref(model.__dict__["_fsdp_root_state"])
    out = {"buckets": len(state().bucket_units), "units": len(live_units())}
    del model, compiled, opt
    gc.collect()
    out.update(state=state() is not None, units_after=len(live_units()), hook=_live_hooks() is not None)
    return out


def test_a_deleted_compiled_model_frees_its_state_units_and_optimizer_hook():
    """The compiled graphs' call wrappers hold the model's state weakly and bucket units belong
    to the state, so Dynamo's code cache (which outlives the model) keeps none of them."""
    for out in run_ranks(_compiled_model_lifetime_rank, 2, timeout=300):
        assert out["buckets"] >= 1 and out["units"] > out["buckets"], out
        assert out == {**out, "state": False, "units_after": 0, "hook": False}, out
