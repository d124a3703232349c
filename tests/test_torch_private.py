"""Every private torch API the library uses goes through ``fsdp_compile.torch_private``; each test
here checks one of them (it exists, takes what we pass, does what we rely on), so that a torch
upgrade that moves or changes one fails here, by name, instead of deep inside a training step.

Single process: the process-group checks run on a one-rank gloo group or on torch's fake
process group, made and destroyed inside the test; one check forks a rank, to see what ranks
inherit.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fsdp_compile import torch_private as tp
from fsdp_compile.testing.spawn import run_ranks


@contextlib.contextmanager
def _one_rank_gloo():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=77))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _fake_world(world: int):
    dist.init_process_group("fake", store=tp.fake_store(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_name_the_door_exports_exists():
    assert all(hasattr(tp, name) for name in tp.__all__)


# ---- process groups -------------------------------------------------------------------------
def test_c10d_functional_ops():
    for op in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "wait_tensor"):
        assert getattr(tp.c10d_functional, op).default.namespace == "_c10d_functional"


def test_gloo_twin_building_blocks():
    """gloo_options / process_group_over / register_process_group / resolve_process_group /
    cpu_backend / gloo_threads / default_store: a one-worker twin of a one-rank group, found
    by name by a functional collective, then aborted."""
    with _one_rank_gloo() as world:
        theirs = tp.cpu_backend(world).options
        assert tp.gloo_threads(theirs) == 2, "torch's default gloo worker count"
        options = tp.gloo_options(threads=1, like=theirs)
        assert tp.gloo_threads(options) == 1
        assert options._timeout == timedelta(seconds=77) and len(options._devices) == 1
        assert len(tp.gloo_options(threads=3)._devices) == 1
        store = dist.PrefixStore("twin/", tp.default_store())
        assert isinstance(tp.default_store(), dist.Store)
        backend = dist.ProcessGroupGloo(store, 0, 1, options)
        twin = tp.process_group_over(store, 0, 1, backend, "test_twin")
        assert twin.group_name == "test_twin"
        assert tp.resolve_process_group("test_twin") is twin
        assert tp.resolve_process_group(world.group_name) is world
        assert tp.gloo_threads(tp.cpu_backend(twin).options) == 1
        out = tp.c10d_functional.wait_tensor(tp.c10d_functional.all_reduce(torch.ones(3), "sum", "test_twin"))
        assert out.tolist() == [1.0, 1.0, 1.0]
        assert world in tp.live_process_groups()
        tp.cpu_backend(twin).abort()
    assert tp.live_process_groups() == {}


# ---- autograd and module hooks --------------------------------------------------------------
def test_current_graph_task_id_and_queue_backward_callback():
    seen, done = [], []

    def hook(grad):
        seen.append(tp.current_graph_task_id())
        tp.queue_backward_callback(lambda: done.append(len(seen)))
        return grad

    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    x.register_hook(hook)
    assert tp.current_graph_task_id() == -1
    y.backward()
    assert len(seen) == 1 and seen[0] != -1
    assert done == [1], "the callback ran once, after the hook, when backward finished"


def test_add_shared_forward_hooks():
    from collections import OrderedDict

    calls = []

    def pre(module, args, kwargs):
        calls.append(("pre", module))

    def post(module, args, kwargs, output):
        calls.append(("post", module))

    pre_id = torch.utils.hooks.RemovableHandle(OrderedDict()).id
    post_id = torch.utils.hooks.RemovableHandle(OrderedDict()).id
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for m in (a, b):
        tp.add_shared_forward_hooks(m, pre_id, pre, post_id, post)
    b(a(torch.ones(1, 2)))
    assert calls == [("pre", a), ("post", a), ("pre", b), ("post", b)]
    assert list(a._forward_hooks) == list(b._forward_hooks) == [post_id]

    def failing(x):
        raise ValueError("boom")

    c = nn.Linear(2, 2)
    c.forward = failing
    tp.add_shared_forward_hooks(c, pre_id, pre, post_id, post)
    calls.clear()
    with pytest.raises(ValueError):
        c(torch.ones(1, 2))
    assert calls == [("pre", c), ("post", c)], "the post hook is always called"

    tp.remove_shared_forward_hooks(a, (pre_id, post_id, -7))  # an absent id is ignored
    calls.clear()
    b(a(torch.ones(1, 2)))
    assert calls == [("pre", b), ("post", b)], "a's hooks are gone, b's stay"


# ---- compilation ----------------------------------------------------------------------------
def test_joint_custom_pass_patches_functorch_config():
    import torch._functorch.config as functorch_config

    def joint(gm, inputs):
        return gm

    before = functorch_config.joint_custom_pass
    with tp.joint_custom_pass(joint):
        assert functorch_config.joint_custom_pass is joint
    assert functorch_config.joint_custom_pass is before


def test_joint_custom_pass_runs_on_the_joint_graph():
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition

    seen = []

    def joint(gm, inputs):
        seen.append(gm)
        return gm

    backend = tp.aot_autograd(
        fw_compiler=lambda g, i: make_boxed_func(g.forward), bw_compiler=lambda g, i: make_boxed_func(g.forward),
        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True,
    )
    torch.compiler.reset()
    with tp.joint_custom_pass(joint):
        fn = torch.compile(lambda x: (x.sin() * 2).sum(), backend=backend)
        x = torch.ones(3, requires_grad=True)
        fn(x).backward()
    torch.compiler.reset()
    assert len(seen) == 1 and isinstance(seen[0], torch.fx.GraphModule)
    assert torch.allclose(x.grad, 2 * torch.ones(3).cos())


def test_inductor_config_keys():
    keys = tp.inductor_config_keys()
    assert {"reorder_for_peak_memory", "force_disable_caches"} <= keys
    assert "no_such_option" not in keys


def test_compile_fx_takes_our_inner_compile():
    """compile_fx hands each partitioned graph to ``inner_compile`` with ``is_backward`` among
    its keyword arguments, which ``compile_fx_inner`` accepts."""
    import torch._inductor.compile_fx as cfx

    assert {"inner_compile", "config_patches"} <= set(inspect.signature(cfx.compile_fx).parameters)
    assert "is_backward" in cfx._CompileFxKwargs.__annotations__
    assert inspect.signature(cfx.compile_fx_inner).parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD


def _compilers_prepared(rank, world):
    from torch._inductor.codecache import CacheBase
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return valid_vec_isa_list.cache_info().currsize, CacheBase.get_system.cache_info().currsize


def test_prepare_compilers_once_starts_no_thread_and_forked_ranks_inherit_it():
    """The suite's rank fork server calls it (``fsdp_compile.testing.prepared_compilers``): a
    thread started there would be missing in every forked rank, and its caches must be filled
    when a rank starts."""
    before = threading.active_count()
    tp.prepare_compilers_once()
    assert threading.active_count() == before
    assert run_ranks(_compilers_prepared, 1) == [(1, 1)]


def test_boxed_call_is_functorchs_convention():
    from functorch.compile import make_boxed_func

    assert tp.is_boxed_call(make_boxed_func(lambda args: args))
    fn = tp.set_boxed_call(lambda args: args)
    assert tp.is_boxed_call(fn) and not tp.is_boxed_call(lambda: 0)
    assert not tp.is_boxed_call(tp.set_boxed_call(lambda: 0, False))


def test_error_on_recompile():
    from torch._dynamo.exc import RecompileError

    torch.compiler.reset()
    fn = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
    fn(torch.ones(2))
    tp.error_on_recompile(True)
    try:
        with pytest.raises(RecompileError):
            fn(torch.ones(2, dtype=torch.float64))
    finally:
        tp.error_on_recompile(False)
        torch.compiler.reset()
    assert torch._dynamo.config.error_on_recompile is False


def test_dynamo_scope_id_is_one_at_a_graphs_top_level_and_more_inside_a_checkpointed_body():
    from torch.utils.checkpoint import checkpoint

    @torch.compiler.assume_constant_result
    def scope() -> int:
        return tp.dynamo_scope_id()

    def body(x):  # a side effect is refused here: the scope comes out in the value
        return x * scope()

    def fn(x):
        return x * scope(), checkpoint(body, x, use_reentrant=False)

    torch.compiler.reset()
    try:
        top, inside = torch.compile(fn, backend="eager", fullgraph=True)(torch.ones(1))
    finally:
        torch.compiler.reset()
    assert top.item() == 1 and inside.item() > 1, (top, inside)


def test_skip_code_as_frame_runs_the_function_eagerly_yet_traces_it_inline():
    from torch._dynamo.utils import counters

    def helper(x):
        return x * 2

    def caller(x):
        return helper(x) + 1

    assert tp.skip_code_as_frame(helper.__code__)
    torch.compiler.reset()
    counters.clear()
    try:
        assert torch.compile(helper, backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]
        assert counters["stats"]["unique_graphs"] == 0, "helper is never a frame of its own"
        assert torch.compile(caller, backend="eager", fullgraph=True)(torch.ones(2)).tolist() == [3.0, 3.0]
        assert counters["stats"]["unique_graphs"] == 1, "yet traced inline from a compiled caller"
    finally:
        torch.compiler.reset()


def test_recompute_tags_are_what_the_partitioner_reads():
    import torch._functorch.partitioners as partitioners
    from torch.utils.checkpoint import CheckpointPolicy

    source = inspect.getsource(partitioners)
    assert f'"{tp.RECOMPUTE_KEY}"' in source and f'"{tp.AC_GRAPH_ID_KEY}"' in source
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    tp.tag_recompute(node, CheckpointPolicy.MUST_RECOMPUTE, 7)
    assert node.meta == {"recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 7}


def test_fake_tensors():
    with tp.FakeTensorMode():
        fake = torch.empty(4)
        with tp.unset_fake_temporarily():
            real = torch.empty(4)
    assert isinstance(fake, tp.FakeTensor) and tp.is_fake(fake)
    assert not tp.is_fake(real) and not isinstance(real, tp.FakeTensor)


def test_op_types():
    assert isinstance(torch.ops.aten.add.Tensor, tp.OpOverload)
    assert tp.op_schema_name(torch.ops.aten.add.Tensor) == "aten::add"
    assert tp.op_schema_name(tp.c10d_functional.wait_tensor.default) == "_c10d_functional::wait_tensor"
    assert isinstance(torch.ops.higher_order.tag_activation_checkpoint, tp.HigherOrderOperator)
    assert isinstance(tp.triton_kernel_wrapper_functional, tp.HigherOrderOperator)


def test_storage_id_tells_shared_storages_apart_also_for_fake_tensors():
    a = torch.zeros(4)
    assert tp.storage_id(a[1:]) == tp.storage_id(a) == tp.storage_id(a.untyped_storage())
    assert tp.storage_id(a.clone()) != tp.storage_id(a)
    with tp.FakeTensorMode():
        f = torch.zeros(4)
        assert tp.storage_id(f.view(2, 2)) == tp.storage_id(f) != tp.storage_id(torch.zeros(4))


def test_dispatch_mode_and_popping_it_temporarily():
    seen = []

    class Names(tp.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(tp.op_schema_name(func))
            return func(*args, **(kwargs or {}))

    with Names():
        torch.ones(2).add(1)
        with tp.pop_dispatch_mode_temporarily():
            torch.ones(2).mul(2)
        torch.ones(2).sub(1)
    assert [n for n in seen if n in ("aten::add", "aten::mul", "aten::sub")] == ["aten::add", "aten::sub"]


def test_pytree():
    assert tp.tree_map(lambda t: t * 2, {"a": (1, [2])}) == {"a": (2, [4])}
    assert tp.tree_leaves({"a": (1, [2]), "b": None}) == [1, 2, None], "None is a leaf (optree's is not)"


def test_apply_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint  # noqa: F401 (what the wrapper runs)

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    tp.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
    assert type(model[0]).__name__ == "CheckpointWrapper"
    model(torch.ones(1, 2, requires_grad=True)).sum().backward()


# ---- DTensor and DeviceMesh -----------------------------------------------------------------
def test_meshes_and_dtensor_internals():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    with _fake_world(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        flat = tp.flatten_mesh(mesh)
        assert tp.root_mesh(mesh["tp"]) is mesh and tp.root_mesh(mesh) is mesh
        assert [tp.mesh_dim_group_name(mesh, d) for d in range(2)] == [mesh.get_group(d).group_name for d in range(2)]
        assert flat.ndim == 1 and flat.size() == 4 and flat.get_group().size() == 4
        both = tp.concatenate_meshes([mesh["dp"], mesh["tp"]])
        assert both.mesh_dim_names == ("dp", "tp") and both.mesh.tolist() == mesh.mesh.tolist()
        placement = tp.strided_shard(0, split_factor=2)
        assert placement.dim == 0 and placement.split_factor == 2 and "StridedShard" in type(placement).__name__

        dt = DTensor.from_local(torch.arange(4.0), mesh["tp"], (Shard(0),), run_check=False)
        assert tp.local_tensor(dt).tolist() == [0.0, 1.0, 2.0, 3.0] and dt.shape == (8,)
        tp.set_local_tensor(dt, torch.arange(2.0))
        assert tp.local_tensor(dt).tolist() == [0.0, 1.0]
        tp.set_dtensor_placement(dt, mesh, (placement, Shard(0)))
        assert dt.device_mesh is mesh and dt.placements == (placement, Shard(0)) and dt.shape == (8,)
        tp.set_dtensor_placement(dt, mesh["tp"], [Replicate()])
        assert dt.placements == (Replicate(),)


def test_profiled_events_and_cpu_allocations_with_addresses():
    from torch.profiler import ProfilerActivity, profile

    x = torch.ones(1000)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = x + 1
        del y
    assert "aten::add" in {e.name() for e in tp.profiled_events(prof)}
    allocations = tp.profiled_cpu_allocations(prof)
    sizes = [(ptr, nbytes) for _, ptr, nbytes, _ in allocations]
    ((ptr, _),) = [(p, n) for p, n in sizes if n == 4000]  # y's storage, under aten::add
    assert (ptr, -4000) in sizes, "its free at the same address"
    assert [t for t, _, _, _ in allocations] == sorted(t for t, _, _, _ in allocations)
    assert any("aten::add" in names for _, p, n, names in allocations if p == ptr and n == 4000)
