"""The one door to torch's private APIs: every private torch symbol the library uses outside
``kernels/`` is imported or wrapped here, once, with what it is for and whether torch 2.13 has
a public replacement (where one exists and behaves the same, the library calls it directly and
it is not here). A torch upgrade that moves or changes one of these fails in
``tests/test_torch_private.py``, which checks each of them by name.

Imports that would load a heavy or side-effecting torch module (Inductor, the fake process
group, which registers the ``"fake"`` backend) stay inside the wrapper that needs them, as
they were at their call sites.

Not routed here: ``nn.Module``'s own storage and override points (``_parameters``,
``_buffers``, ``_apply``, ``_save_to_state_dict``, ``_load_from_state_dict``) and
``Tensor._version``, which subclasses and wrappers (torch's FSDP among them) use as the
module's extension surface.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch._functorch.config as _functorch_config
import torch.distributed as dist
import torch.fx
from torch._C._distributed_c10d import _register_process_group
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional  # noqa: F401 (re-export)
from torch._ops import HigherOrderOperator, OpOverload  # noqa: F401 (re-export)
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, is_fake, unset_fake_temporarily  # noqa: F401
from torch.utils._pytree import tree_leaves, tree_map  # noqa: F401 (re-export)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401 (re-export; no public path)

__all__ = [
    "c10d_functional", "register_process_group", "resolve_process_group", "default_store", "live_process_groups",
    "cpu_backend", "gloo_options", "gloo_threads", "process_group_over",
    "current_graph_task_id", "queue_backward_callback", "add_shared_forward_hooks",
    "joint_custom_pass", "inductor_config_keys", "aot_autograd", "compile_fx", "compile_fx_inner",
    "prepare_compilers_once",
    "set_boxed_call", "is_boxed_call", "error_on_recompile",
    "RECOMPUTE_KEY", "AC_GRAPH_ID_KEY", "tag_recompute",
    "FakeTensor", "FakeTensorMode", "is_fake", "unset_fake_temporarily", "fake_store",
    "OpOverload", "HigherOrderOperator", "op_schema_name", "triton_kernel_wrapper_functional",
    "tree_map", "tree_leaves", "TorchDispatchMode", "storage_id", "pop_dispatch_mode_temporarily",
    "remove_shared_forward_hooks", "root_mesh", "mesh_dim_group_name", "dynamo_scope_id", "skip_code_as_frame", "apply_activation_checkpointing",
    "local_tensor", "set_local_tensor", "set_dtensor_placement", "strided_shard", "concatenate_meshes",
    "flatten_mesh", "profiled_events", "profiled_cpu_allocations",
]

# ---- process groups (c10d) ------------------------------------------------------------------
# The functional collectives' op namespace (what eager and traced collectives both call).
# Public wrappers (torch.distributed._functional_collectives) are private too and add DTensor
# handling we do not want in our graphs; no public replacement.
c10d_functional = torch.ops._c10d_functional


def register_process_group(name: str, group: dist.ProcessGroup) -> None:
    """Make ``group`` resolvable by ``name`` for functional collectives (the gloo twin). No public
    replacement: ``new_group`` registers only the groups it creates itself."""
    _register_process_group(name, group)


def resolve_process_group(name: str) -> dist.ProcessGroup:
    """The process group a functional collective's group name denotes. No public replacement."""
    return dist.distributed_c10d._resolve_process_group(name)


def default_store() -> dist.Store:
    """The store of the default process group (twins' rendezvous, failure reports). No public
    replacement."""
    return dist.distributed_c10d._get_default_store()


def live_process_groups() -> dict:
    """The process groups not yet destroyed (``destroy_process_group`` removes them), by group.
    No public replacement."""
    return dist.distributed_c10d._world.pg_map if dist.is_initialized() else {}


def cpu_backend(group: dist.ProcessGroup):
    """``group``'s backend object for CPU tensors (its options; ``abort()``). No public
    replacement."""
    return group._get_backend(torch.device("cpu"))


def gloo_options(threads: int, like=None):
    """``ProcessGroupGloo`` options with ``threads`` worker threads and ``like``'s devices and
    timeout (else the default device). No public replacement: ``init_process_group`` and
    ``new_group`` take no gloo options."""
    options = dist.ProcessGroupGloo._Options()
    if like is not None:
        options._devices = like._devices
        options._timeout = like._timeout
    else:
        options._devices = [dist.ProcessGroupGloo.create_default_device()]
    options._threads = threads
    return options


def gloo_threads(options) -> int:
    """How many worker threads gloo ``options`` run. No public replacement."""
    return options._threads


def process_group_over(store: dist.Store, rank: int, size: int, backend, name: str) -> dist.ProcessGroup:
    """A ``ProcessGroup`` whose CPU backend is ``backend`` (a ``ProcessGroupGloo``), named and
    registered as ``name``. No public replacement: ``new_group`` builds its own backend."""
    group = dist.ProcessGroup(store, rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_group_name(name)
    register_process_group(name, group)
    return group


# ---- autograd and nn.Module hooks -----------------------------------------------------------
def current_graph_task_id() -> int:
    """The running backward's graph task id, -1 outside backward (recompute detection). No
    public replacement."""
    return torch._C._current_graph_task_id()


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward finishes. No public replacement (torch's FSDP
    uses the same)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def add_shared_forward_hooks(module: torch.nn.Module, pre_id: int, pre: Callable, post_id: int, post: Callable) -> None:
    """``pre`` as a with-kwargs forward pre-hook and ``post`` as an always-called with-kwargs
    forward hook of ``module`` under the given hook ids (one id shared by many modules). Public
    ``register_forward_(pre_)hook`` gives every module its own id, which Dynamo guards on."""
    module._forward_pre_hooks[pre_id] = pre
    module._forward_pre_hooks_with_kwargs[pre_id] = True
    module._forward_hooks[post_id] = post
    module._forward_hooks_with_kwargs[post_id] = True
    module._forward_hooks_always_called[post_id] = True


def remove_shared_forward_hooks(module: torch.nn.Module, hook_ids: tuple[int, ...]) -> None:
    """Undo ``add_shared_forward_hooks`` on ``module`` for ``hook_ids`` (absent ids are ignored)."""
    for hooks in (
        module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
        module._forward_hooks_with_kwargs, module._forward_hooks_always_called,
    ):
        for hook_id in hook_ids:
            hooks.pop(hook_id, None)


# ---- compilation ----------------------------------------------------------------------------
def joint_custom_pass(joint_pass: Callable) -> contextlib.AbstractContextManager:
    """Within: AOTAutograd runs ``joint_pass`` on the joint graph before the partitioner (reshard
    tags). No public replacement."""
    return _functorch_config.patch(joint_custom_pass=joint_pass)


def inductor_config_keys() -> frozenset:
    """Every ``torch._inductor.config`` key. ``torch._inductor.list_options()`` omits some."""
    import torch._inductor.config as inductor_config

    return frozenset(inductor_config._config)


def aot_autograd(**kwargs):
    """Dynamo's AOTAutograd backend factory (the ``inner="aot_eager"`` path). No public
    replacement."""
    from torch._dynamo.backends.common import aot_autograd as factory

    return factory(**kwargs)


def compile_fx(*args, **kwargs):
    """Inductor's entry point taking an ``inner_compile`` (each partitioned graph passes through
    our hook). ``torch.compile(backend="inductor")`` offers no such hook."""
    from torch._inductor.compile_fx import compile_fx as inductor

    return inductor(*args, **kwargs)


def compile_fx_inner(*args, **kwargs):
    """Inductor's per-graph compiler, the default ``inner_compile``. No public replacement."""
    from torch._inductor.compile_fx import compile_fx_inner as inner

    return inner(*args, **kwargs)


def prepare_compilers_once() -> None:
    """Do in this process what the first Inductor compile of every process would otherwise do
    before its graph matters: import the backends, code generators and pattern modules Dynamo
    and Inductor load lazily, probe the CPU's vector instruction sets (which builds a probe and
    loads it in a subprocess), hash torch's source files for the FX graph cache's keys and
    register Inductor's joint-graph and post-grad patterns. Processes forked afterwards (test
    ranks) inherit all of it. Starts no thread. No public replacement."""
    import torch._dynamo
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch.export._trace  # noqa: F401 (what AOTAutograd's export path loads lazily)
    import torch.utils.cpp_extension  # noqa: F401 (Inductor's C++ builder; imports setuptools)
    from torch._inductor.codecache import CacheBase, torch_key
    from torch._inductor.codegen.common import init_backend_registration
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    torch._dynamo.list_backends()  # imports every registered backend module
    init_backend_registration()  # imports every device's code generators
    valid_vec_isa_list()  # cached for the process
    torch_key()  # the FX graph cache's hash of torch's source files, cached for the process
    CacheBase.get_system()  # the cache keys' Triton and device versions, cached for the process
    joint_graph.lazy_init()
    post_grad.lazy_init()


def set_boxed_call(fn: Callable, boxed: bool = True) -> Callable:
    """Mark ``fn`` as taking AOTAutograd's boxed arguments (one list). ``functorch.compile.
    make_boxed_func`` wraps instead of marking."""
    fn._boxed_call = boxed
    return fn


def is_boxed_call(fn: Callable) -> bool:
    """Whether ``fn`` takes AOTAutograd's boxed arguments."""
    return getattr(fn, "_boxed_call", False)


def dynamo_scope_id() -> int:
    """Dynamo's current tracer scope while it traces (1: the graph's top level; more inside a
    higher-order op's body, whose side effects Dynamo refuses). No public replacement."""
    from torch._dynamo.current_scope_id import current_scope_id

    return current_scope_id()


def skip_code_as_frame(code) -> bool:
    """Dynamo never compiles ``code`` as a frame of its own (nor what it calls from there), yet
    still traces it inline from a compiled frame. False (nothing done) on a torch without
    per-code frame strategies. No public replacement."""
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return False
    set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    return True


def error_on_recompile(on: bool) -> None:
    """Make a Dynamo recompile raise (``torch._dynamo.exc.RecompileError``). The public
    ``torch.compiler.set_stance("fail_on_recompile")`` raises another error type."""
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = on


# The partitioner's recompute tags (node.meta keys), which activation checkpointing sets and the
# min-cut partitioner obeys. The policy values are public (torch.utils.checkpoint.CheckpointPolicy);
# the keys are not.
RECOMPUTE_KEY = "recompute"
AC_GRAPH_ID_KEY = "ac_graph_id"


def tag_recompute(node: torch.fx.Node, policy, ac_graph_id: int) -> None:
    """Tag joint-graph ``node`` with a ``CheckpointPolicy`` for the partitioner, in region
    ``ac_graph_id``."""
    node.meta[RECOMPUTE_KEY] = policy
    node.meta[AC_GRAPH_ID_KEY] = ac_graph_id


def fake_store():
    """A store for ``init_process_group("fake", ...)`` (one process standing in for any rank).
    Importing it registers the ``"fake"`` backend. No public replacement."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def storage_id(tensor) -> int:
    """The identity of the storage ``tensor`` views (or of ``tensor``, an ``UntypedStorage``),
    also for a fake tensor (whose ``data_ptr()`` is deprecated and meaningless): the address of
    its ``StorageImpl``. Equal for two tensors exactly when they share a storage, while both are
    alive. No public replacement."""
    storage = tensor if isinstance(tensor, torch.UntypedStorage) else tensor.untyped_storage()
    return storage._cdata


def pop_dispatch_mode_temporarily():
    """Within: the innermost ``TorchDispatchMode`` is off (the estimator's step tracker, while a
    compiled block runs). No public replacement."""
    from torch.utils._python_dispatch import _pop_mode_temporarily

    return _pop_mode_temporarily()


def op_schema_name(op: OpOverload) -> str:
    """``"namespace::name"`` of ``op``, without its overload. No public replacement
    (``op.name()`` appends a non-default overload)."""
    return op._schema.name


def apply_activation_checkpointing(model: torch.nn.Module, **kwargs) -> None:
    """Wrap submodules of ``model`` in non-reentrant checkpointing (torch's FSDP recipe). No
    public replacement."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as apply

    apply(model, **kwargs)


# ---- DTensor and DeviceMesh -----------------------------------------------------------------
def local_tensor(dtensor) -> torch.Tensor:
    """``dtensor``'s local tensor itself, outside autograd. ``to_local()`` is the public read but
    goes through an autograd function when grad mode is on."""
    return dtensor._local_tensor


def set_local_tensor(dtensor, local: torch.Tensor) -> None:
    """Make the same DTensor object hold ``local`` (FSDP2 does this to its sharded parameters).
    No public replacement."""
    dtensor._local_tensor = local


def set_dtensor_placement(dtensor, mesh, placements) -> None:
    """Place the same DTensor object on ``mesh`` with ``placements``, keeping its global shape
    and stride. No public replacement (``redistribute`` makes a new tensor)."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    dtensor._spec = DTensorSpec(mesh, tuple(placements), tensor_meta=dtensor._spec.tensor_meta)


def strided_shard(dim: int, split_factor: int):
    """FSDP2's dp placement of a parameter that TP also splits along ``dim``. No public
    replacement."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


def concatenate_meshes(meshes: list):
    """The mesh spanning ``meshes``' dims, slices of one root mesh. No public replacement."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh._concatenate(meshes)


def mesh_dim_group_name(mesh, dim: int) -> str:
    """The name of the process group of ``mesh``'s dim ``dim``, without resolving the group:
    ``mesh.get_group(dim).group_name`` resolves it, which a mesh built on torch's fake process
    group (``fsdp_compile.estimate``) cannot. No public replacement."""
    return mesh._dim_group_names[dim]


def root_mesh(mesh):
    """The mesh ``mesh`` was sliced from (itself when it is a root). No public replacement."""
    return mesh._get_root_mesh()


def flatten_mesh(mesh):
    """``mesh`` as one 1-D mesh over all its ranks (its group holds every rank). No public
    replacement."""
    return mesh._flatten()


# ---- profiler -------------------------------------------------------------------------------
def profiled_events(prof) -> list:
    """The raw events a finished ``torch.profiler.profile`` recorded (each with ``name()``). The
    public ``prof.events()`` builds the whole function-event tree, far slower. No public
    replacement."""
    return list(prof.profiler.kineto_results.events())


def profiled_cpu_allocations(prof) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """``(time ns, address, +bytes allocated / -bytes freed, names of the enclosing ops)`` of every
    CPU allocator event a ``profile(profile_memory=True)`` recorded, in time order. The public
    ``[memory]`` events carry no address, which telling a reused block from a new one needs. No
    public replacement."""
    out = []
    stack = [(root, ()) for root in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, names = stack.pop()
        kind, fields = node.typed
        if kind.name == "Allocation":
            if fields.device.type == "cpu":
                out.append((node.start_time_ns, fields.ptr, fields.alloc_size, names))
            continue
        stack.extend((child, names + (node.name,)) for child in node.children)
    out.sort(key=lambda a: a[0])
    return out
