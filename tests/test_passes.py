"""Each FX pass on a small hand-built graph: the exact node sequence before and after.

No process group: units are built with world size 1 (``fully_shard`` without
``torch.distributed``), and graphs that name collectives are only analysed, never run.
"""
from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

import fsdp_compile
from fsdp_compile import ops
from fsdp_compile.config import ShardingStrategy
from fsdp_compile.passes.hoist_markers import hoist_markers
from fsdp_compile.passes.insert_collectives import insert_collectives
from fsdp_compile.passes.reshard import tag_reshard
from fsdp_compile.passes.schedule_check import collective_schedule

c10d = torch.ops._c10d_functional
fc = torch.ops.fsdp_compile


def _unit_of_linear():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    reference = (lin.weight.detach().clone(), lin.bias.detach().clone())
    fsdp_compile.fully_shard(lin)
    return lin, fsdp_compile.sharding_info(lin).units[0], reference


def _targets(gm):
    return [n.target if n.op == "call_function" else n.op for n in gm.graph.nodes]


def test_insert_collectives_one_gather_per_unit_before_first_use():
    lin, unit, (w_ref, b_ref) = _unit_of_linear()
    graph = torch.fx.Graph()
    w_shard, b_shard, x = (graph.placeholder(n) for n in ("w_shard", "b_shard", "x"))
    shards = [w_shard, b_shard]
    w = graph.call_function(fc.param_use.default, (shards, None, unit.id, 0, ops.GradMode.SYNC))
    b = graph.call_function(fc.param_use.default, (shards, None, unit.id, 1, ops.GradMode.SYNC))
    y = graph.call_function(F.linear, (x, w, b))
    w_again = graph.call_function(fc.param_use.default, (shards, None, unit.id, 0, ops.GradMode.SYNC))
    z = graph.call_function(torch.matmul, (y, w_again))
    graph.output(z)
    gm = torch.fx.GraphModule(nn.Module(), graph)

    gathers = insert_collectives(gm)

    assert [(g.unit_id, g.mode, g.indices) for g in gathers] == [(unit.id, ops.GradMode.SYNC, (0, 1))]
    assert _targets(gm) == [
        "placeholder", "placeholder", "placeholder",
        ops.gather_unit, operator.getitem, operator.getitem,
        F.linear, torch.matmul, "output",
    ]
    gather = next(n for n in gm.graph.nodes if n.target is ops.gather_unit)
    assert gather.args == (unit.id, ops.GradMode.SYNC, None, w_shard, b_shard)
    # Both reads of the weight are now the same getitem.
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    matmul = next(n for n in gm.graph.nodes if n.target is torch.matmul)
    assert linear.args[1] is matmul.args[1]
    # And the rewritten graph computes what the plain module computes.
    x_val = torch.randn(2, 4)
    expected = (x_val @ w_ref.t() + b_ref) @ w_ref
    torch.testing.assert_close(gm(lin.weight, lin.bias, x_val), expected, rtol=0, atol=0)


def test_insert_collectives_leaves_graphs_without_markers_alone():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    before = _targets(gm)
    assert insert_collectives(gm) == []
    assert _targets(gm) == before


def _gather_chain_graph(with_cast: bool = False):
    """copy_in -> all_gather -> wait -> copy_out -> getitem -> t -> mm (a joint-graph forward)."""
    graph = torch.fx.Graph()
    shard, x = graph.placeholder("primals_1"), graph.placeholder("primals_2")
    copy_in = graph.call_function(fc.all_gather_copy_in.default, ([shard], [8], torch.float32))
    ag = graph.call_function(c10d.all_gather_into_tensor.default, (copy_in, 2, "0"))
    wait = graph.call_function(c10d.wait_tensor.default, (ag,))
    copy_out = graph.call_function(fc.all_gather_copy_out.default, (wait, [4, 4], [2], 2))
    full = graph.call_function(operator.getitem, (copy_out, 0))
    t = graph.call_function(torch.ops.aten.t.default, (full,))
    mm = graph.call_function(torch.ops.aten.mm.default, (x, t))
    graph.output(mm)
    for node in (copy_in, ag, wait, copy_out):  # as traced inside gather_unit (its annotation)
        node.meta["custom"] = {"fsdp_unit": 0}
    gm = torch.fx.GraphModule(nn.Module(), graph)
    return gm, {"copy_in": copy_in, "ag": ag, "wait": wait, "copy_out": copy_out, "full": full, "t": t, "mm": mm}


def test_reshard_full_shard_tags_whole_gather_chain_must_recompute():
    gm, nodes = _gather_chain_graph()
    tag_reshard(gm, lambda unit: ShardingStrategy.FULL_SHARD)
    tagged = {name for name, n in nodes.items() if n.meta.get("recompute") is CheckpointPolicy.MUST_RECOMPUTE}
    assert tagged == {"copy_in", "ag", "wait", "copy_out", "full", "t"}
    assert "recompute" not in nodes["mm"].meta


def test_reshard_shard_grad_op_saves_the_gathered_parameters():
    gm, nodes = _gather_chain_graph()
    tag_reshard(gm, lambda unit: ShardingStrategy.SHARD_GRAD_OP)
    tagged = {name for name, n in nodes.items() if n.meta.get("recompute") is CheckpointPolicy.MUST_SAVE}
    assert tagged == {"copy_in", "ag", "wait", "copy_out", "full", "t"}
    assert all(n.meta.get("ac_graph_id") == 100000 for name, n in nodes.items() if name in tagged)


def test_reshard_reads_each_gathers_unit_from_node_annotations():
    gm, nodes = _gather_chain_graph()
    nodes["wait"].meta["custom"] = {"fsdp_unit": 7}
    seen = []
    tag_reshard(gm, lambda unit: seen.append(unit) or ShardingStrategy.FULL_SHARD)
    assert seen == [7]


def test_reshard_and_prefetch_leave_unannotated_all_gathers_alone():
    """An all-gather not traced inside one of our gathers is a user's: neither tagged nor moved."""
    from fsdp_compile.passes.reorder import prefetch_all_gathers

    gm, nodes = _gather_chain_graph()
    for node in gm.graph.nodes:
        node.meta.pop("custom", None)
    tag_reshard(gm, lambda unit: ShardingStrategy.FULL_SHARD)
    assert not any("recompute" in n.meta for n in gm.graph.nodes)
    gm, n = _two_gathers_graph()
    for node in gm.graph.nodes:
        node.meta.pop("custom", None)
    assert prefetch_all_gathers(gm, 1) == 0


def test_schedule_lists_collectives_in_program_order_with_bytes():
    gm, nodes = _gather_chain_graph()
    nodes["copy_in"].meta["val"] = torch.empty(8, dtype=torch.bfloat16)
    graph = gm.graph
    with graph.inserting_before(nodes["mm"]):
        rs = graph.call_function(c10d.reduce_scatter_tensor.default, (nodes["copy_in"], "sum", 2, "0"))
        graph.call_function(c10d.wait_tensor.default, (rs,))
    schedule = collective_schedule(gm)
    assert [(c.kind, c.input_bytes, c.dtype) for c in schedule] == [
        ("all_gather_into_tensor", 16, "bfloat16"),
        ("reduce_scatter_tensor", 16, "bfloat16"),
    ]


def _two_gathers_graph():
    """unit A: copy_in -> ag -> wait -> relu(compute); unit B: the same, after A's compute."""
    graph = torch.fx.Graph()
    a, b = graph.placeholder("primals_1"), graph.placeholder("primals_2")
    names = {}
    previous = None
    for tag, shard in (("a", a), ("b", b)):
        copy_in = graph.call_function(fc.all_gather_copy_in.default, ([shard], [4], torch.float32))
        ag = graph.call_function(c10d.all_gather_into_tensor.default, (copy_in, 2, "0"))
        wait = graph.call_function(c10d.wait_tensor.default, (ag,))
        inputs = (wait,) if previous is None else (wait, previous)
        compute = graph.call_function(torch.ops.aten.add.Tensor if previous is not None else torch.ops.aten.relu.default, inputs)
        previous = compute
        for node in (copy_in, ag, wait):  # as traced inside gather_unit (its annotation)
            node.meta["custom"] = {"fsdp_unit": len(names)}
        names.update({f"copy_in_{tag}": copy_in, f"ag_{tag}": ag, f"wait_{tag}": wait, f"compute_{tag}": compute})
    graph.output(previous)
    return torch.fx.GraphModule(nn.Module(), graph), names


def test_prefetch_issues_next_all_gather_before_previous_compute():
    from fsdp_compile.passes.reorder import prefetch_all_gathers

    gm, n = _two_gathers_graph()
    order_before = [node.name for node in gm.graph.nodes]
    assert prefetch_all_gathers(gm, 0) == 0
    assert [node.name for node in gm.graph.nodes] == order_before
    assert prefetch_all_gathers(gm, 1) == 1
    names = {v.name: k for k, v in n.items()}
    assert [names.get(node.name, node.op) for node in gm.graph.nodes] == [
        "placeholder", "placeholder",
        "copy_in_a", "ag_a", "wait_a", "copy_in_b", "ag_b",  # B's gather now overlaps A's compute
        "compute_a", "wait_b", "compute_b", "output",
    ]


@pytest.mark.parametrize("copy_out_kind", ["fused op", "wrap_triton launch"])
def test_prefetch_issues_next_all_gather_after_previous_copy_out(copy_out_kind):
    """With a copy-out (our op on CPU, a Triton launch on CUDA), the next gather follows it (the
    gathered buffer's last reader), so the buffer is freed before the next gather's buffers
    exist; the copy-out's outputs are used later."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

    from fsdp_compile.passes.reorder import prefetch_all_gathers

    gm, n = _two_gathers_graph()
    graph = gm.graph
    for tag in ("a", "b"):
        wait = n[f"wait_{tag}"]
        with graph.inserting_after(wait):
            if copy_out_kind == "fused op":
                copy_out = graph.call_function(fc.all_gather_copy_out.default, (wait, [4], [1], 2))
            else:
                copy_out = graph.call_function(triton_kernel_wrapper_functional, (), {
                    "kernel_idx": 0, "constant_args_idx": 0, "grid": [(1, 1, 1)],
                    "tma_descriptor_metadata": {}, "kwargs": {"src": wait}, "tensors_to_clone": [],
                })
        with graph.inserting_after(copy_out):
            full = graph.call_function(operator.getitem, (copy_out, 0))
        copy_out.meta["custom"] = {"fsdp_unit": 0 if tag == "a" else 1}
        compute = n[f"compute_{tag}"]
        compute.args = (full, *compute.args[1:])
        n[f"copy_out_{tag}"], n[f"full_{tag}"] = copy_out, full
    gm.recompile()
    assert prefetch_all_gathers(gm, 1) == 1
    names = {v.name: k for k, v in n.items()}
    assert [names.get(node.name, node.op) for node in gm.graph.nodes] == [
        "placeholder", "placeholder",
        "copy_in_a", "ag_a", "wait_a", "copy_out_a", "copy_in_b", "ag_b",  # after A's copy-out
        "full_a", "compute_a", "wait_b", "copy_out_b", "full_b", "compute_b", "output",
    ]
    assert prefetch_all_gathers(gm, 1) == 0  # a second run finds everything in place


def test_prefetch_issues_first_all_gather_before_the_compute_in_front_of_it():
    """A backward graph whose first gather follows compute (the head's backward when the root
    stays gathered): the gather is issued right after the graph's inputs, its wait stays."""
    from fsdp_compile.passes.reorder import prefetch_all_gathers

    gm, n = _two_gathers_graph()
    graph = gm.graph
    first_copy_in = n["copy_in_a"]
    with graph.inserting_before(first_copy_in):
        head = graph.call_function(torch.ops.aten.neg.default, (first_copy_in.args[0][0],))
    n["compute_a"].args = (*n["compute_a"].args, head)
    n["compute_a"].target = torch.ops.aten.add.Tensor
    gm.recompile()
    names = {v.name: k for k, v in n.items()}
    names[head.name] = "head"
    assert [names.get(node.name, node.op) for node in gm.graph.nodes][2:5] == ["head", "copy_in_a", "ag_a"]
    assert prefetch_all_gathers(gm, 1) == 2  # A's gather moves ahead of the head, B's ahead of A's compute
    assert [names.get(node.name, node.op) for node in gm.graph.nodes] == [
        "placeholder", "placeholder",
        "copy_in_a", "ag_a", "head", "wait_a", "copy_in_b", "ag_b",
        "compute_a", "wait_b", "compute_b", "output",
    ]
    assert prefetch_all_gathers(gm, 1) == 0  # a second run finds everything in place


def _two_reductions_graph(hybrid: bool = False, gloo: bool = False):
    """The backward of two units: unit 2's gradients are reduced (reduce-scatter -> wait ->
    divide; with ``hybrid`` then an all-reduce on the replicate group -> wait), then unit 1's
    backward compute runs and unit 1's gradients are reduced the same way. ``gloo``: the
    reduce-scatter is the ``all_to_all_single`` collectives.py issues on gloo groups."""
    graph = torch.fx.Graph()
    grads = graph.placeholder("grad_2")
    names = {}
    for tag, unit in (("2", 2), ("1", 1)):
        copy_in = graph.call_function(torch.ops.aten.mul.Tensor, (grads, 1.0))
        if gloo:
            rs = graph.call_function(c10d.all_to_all_single.default, (copy_in, [4, 4], [4, 4], "shard"))
        else:
            rs = graph.call_function(c10d.reduce_scatter_tensor.default, (copy_in, "sum", 2, "shard"))
        wait = graph.call_function(c10d.wait_tensor.default, (rs,))
        nodes = {"copy_in": copy_in, "rs": rs, "wait": wait}
        if hybrid:
            ar = graph.call_function(c10d.all_reduce.default, (wait, "sum", "replicate"))
            nodes.update(ar=ar, ar_wait=graph.call_function(c10d.wait_tensor.default, (ar,)))
        nodes["div"] = graph.call_function(torch.ops.aten.div.Tensor, (list(nodes.values())[-1], 2))
        for node in nodes.values():  # as traced inside gather_unit's backward (its annotation)
            node.meta["custom"] = {"fsdp_unit": unit}
        names.update({f"{k}_{tag}": v for k, v in nodes.items()})
        if tag == "2":
            grads = names["compute_1"] = graph.call_function(torch.ops.aten.relu.default, (grads,))
    graph.output((names["div_2"], names["div_1"]))
    return torch.fx.GraphModule(nn.Module(), graph), names


@pytest.mark.parametrize("gloo", [False, True], ids=["reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["1d", "hybrid"])
def test_defer_reduce_waits_overlaps_each_reduction_with_the_next_units_backward(hybrid, gloo):
    from fsdp_compile.passes.defer_reduce_waits import defer_reduce_waits

    gm, n = _two_reductions_graph(hybrid, gloo)
    collectives_before = [node.name for node in gm.graph.nodes if "c10d" in str(node.target) and "wait" not in str(node.target)]
    assert defer_reduce_waits(gm) == 1
    names = {v.name: k for k, v in n.items()}
    unit2_chain = ["wait_2", "ar_2", "ar_wait_2", "div_2"] if hybrid else ["wait_2", "div_2"]
    unit1_chain = ["rs_1", "wait_1", "ar_1", "ar_wait_1", "div_1"] if hybrid else ["rs_1", "wait_1", "div_1"]
    assert [names.get(node.name, node.op) for node in gm.graph.nodes] == [
        "placeholder", "copy_in_2", "rs_2",
        "compute_1", "copy_in_1",  # unit 2's reduction is in flight during unit 1's backward
        *unit2_chain, *unit1_chain, "output",
    ]
    collectives_after = [node.name for node in gm.graph.nodes if "c10d" in str(node.target) and "wait" not in str(node.target)]
    assert collectives_after == collectives_before  # the collectives keep their order


def _two_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    reference = [p.detach().clone() for p in model.parameters()]
    fsdp_compile.fully_shard(model, policy={nn.Linear})
    return model, list(fsdp_compile.sharding_info(model).units), reference


def test_bucketing_merges_adjacent_gathers_into_one():
    from fsdp_compile.passes.bucketing import bucket_gathers
    from fsdp_compile.unit import Unit

    model, units, (w0, b0, w1, b1) = _two_units()
    u0, u1 = units
    graph = torch.fx.Graph()
    s = [graph.placeholder(f"s{i}") for i in range(4)]
    x = graph.placeholder("x")
    g0 = graph.call_function(ops.gather_unit, (u0.id, ops.GradMode.SYNC, None, s[0], s[1]))
    w0n, b0n = (graph.call_function(operator.getitem, (g0, i)) for i in (0, 1))
    h = graph.call_function(F.linear, (x, w0n, b0n))
    g1 = graph.call_function(ops.gather_unit, (u1.id, ops.GradMode.SYNC, None, s[2], s[3]))
    w1n, b1n = (graph.call_function(operator.getitem, (g1, i)) for i in (0, 1))
    graph.output(graph.call_function(F.linear, (h, w1n, b1n)))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    keep = []

    def make_bucket(ids):
        keep.append(Unit.bucket([u for u in units if u.id in ids]))
        return keep[-1].id

    assert bucket_gathers(gm, bucket_bytes=1, make_bucket=make_bucket) == [[u0.id], [u1.id]]
    assert bucket_gathers(gm, bucket_bytes=1 << 20, make_bucket=make_bucket) == [[u0.id, u1.id]]
    gathers = [node for node in gm.graph.nodes if node.target is ops.gather_unit]
    assert len(gathers) == 1 and gathers[0].args == (keep[0].id, ops.GradMode.SYNC, None, *s)
    assert [node.args[1] for node in gm.graph.nodes if node.target is operator.getitem] == [0, 1, 2, 3]
    x_val = torch.randn(3, 4)
    expected = F.linear(F.linear(x_val, w0, b0), w1, b1)
    params = [p for p in model.parameters()]
    torch.testing.assert_close(gm(*params, x_val), expected, rtol=0, atol=0)


PASSES = sorted(p.stem for p in (Path(__file__).parent.parent / "passes").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", PASSES)
def test_each_pass_imports_first_in_a_fresh_interpreter(name, imported_first):
    """``passes/`` installs as ``fsdp_compile.passes`` (no generic top-level ``passes`` module),
    and any pass can be the first thing a program imports (no partial-initialization cycle)."""
    code, text = imported_first[f"fsdp_compile.passes.{name}"]  # tests/conftest.py
    assert code == 0, text
    assert text == f"fsdp_compile.passes.{name}"


def _checkpointed_linear_graph(unit, nested: bool = False):
    """``tag_activation_checkpoint(body, s0, s1, x)`` whose body reads the weight twice and the
    bias once through markers (Dynamo's graph of a checkpointed ``Linear``); ``nested``: the body
    is itself a region around that body."""
    inner = torch.fx.Graph()
    s0, s1, x = (inner.placeholder(n) for n in ("s0", "s1", "x"))
    w = inner.call_function(fc.param_use.default, ([s0, s1], None, unit.id, 0, ops.GradMode.SYNC))
    b = inner.call_function(fc.param_use.default, ([s0, s1], None, unit.id, 1, ops.GradMode.SYNC))
    y = inner.call_function(F.linear, (x, w, b))
    w_again = inner.call_function(fc.param_use.default, ([s0, s1], None, unit.id, 0, ops.GradMode.SYNC))
    inner.output(inner.call_function(torch.matmul, (y, w_again)))
    body = torch.fx.GraphModule(nn.Module(), inner)
    if nested:
        middle = torch.fx.Graph()
        ms = [middle.placeholder(n) for n in ("s0", "s1", "x")]
        region = middle.get_attr("inner_body")
        middle.output(middle.call_function(torch.ops.higher_order.tag_activation_checkpoint, (region, *ms)))
        root = nn.Module()
        root.inner_body = body
        body = torch.fx.GraphModule(root, middle)
    outer = torch.fx.Graph()
    os_ = [outer.placeholder(n) for n in ("s0", "s1", "x")]
    region = outer.get_attr("body")
    outer.output(outer.call_function(torch.ops.higher_order.tag_activation_checkpoint, (region, *os_)))
    root = nn.Module()
    root.body = body
    return torch.fx.GraphModule(root, outer), os_


@pytest.mark.parametrize("nested", [False, True], ids=["one_region", "nested_regions"])
def test_hoist_markers_lifts_each_parameter_read_out_of_checkpoint_regions(nested):
    lin, unit, (w_ref, b_ref) = _unit_of_linear()
    gm, (s0, s1, x) = _checkpointed_linear_graph(unit, nested)
    tac = torch.ops.higher_order.tag_activation_checkpoint

    assert hoist_markers(gm) == 2  # the weight (read twice) and the bias: one marker each

    assert _targets(gm) == [
        "placeholder", "placeholder", "placeholder", "get_attr",
        fc.param_use.default, fc.param_use.default, tac, "output",
    ]
    w_out, b_out = (n for n in gm.graph.nodes if n.target is fc.param_use.default)
    assert w_out.args == ([s0, s1], None, unit.id, 0, ops.GradMode.SYNC)
    assert b_out.args == ([s0, s1], None, unit.id, 1, ops.GradMode.SYNC)
    call = next(n for n in gm.graph.nodes if n.target is tac)
    assert call.args[1:] == (s0, s1, x, w_out, b_out)
    inner = gm.body
    if nested:
        assert _targets(gm.body) == [*["placeholder"] * 5, "get_attr", tac, "output"]
        middle_inputs = [n for n in gm.body.graph.nodes if n.op == "placeholder"]
        inner_call = next(n for n in gm.body.graph.nodes if n.target is tac)
        assert inner_call.args[1:] == tuple(middle_inputs)
        inner = gm.body.inner_body
    assert _targets(inner) == [*["placeholder"] * 5, F.linear, torch.matmul, "output"]
    w_in, b_in = [n for n in inner.graph.nodes if n.op == "placeholder"][3:]
    linear = next(n for n in inner.graph.nodes if n.target is F.linear)
    matmul = next(n for n in inner.graph.nodes if n.target is torch.matmul)
    assert linear.args[1:] == (w_in, b_in) and matmul.args[1] is w_in
    # And the rewritten graph computes what the plain module computes.
    x_val = torch.randn(2, 4)
    expected = (x_val @ w_ref.t() + b_ref) @ w_ref
    with pytest.warns(UserWarning, match="one read at a time"):  # markers run eagerly here
        got = gm(lin.weight, lin.bias, x_val)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert hoist_markers(gm) == 0  # a second run finds nothing to lift
