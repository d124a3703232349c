"""The systems the step benchmark trains, one table: name -> how to build it.

Owns the models (``model_config``) and the systems (``SYSTEMS``); never measures anything
(``measure.py``) or prints a table (``report.py``). Adding a system is one ``SYSTEMS`` entry: a
builder ``(model, world, cfg) -> (model to call, loss scale for backward)``, called on every rank
after the process group exists and after ``torch.manual_seed(SEED)`` built ``model``, and a
one-line description. The builders use only public APIs of torch and fsdp_compile.

Every system trains from the same seed on the same data (``gpt_batch(step, rank)``, different per
rank) with ``AdamW(lr=LR)``. A tensor-parallel system (``tp > 1``) runs on a ``(world // tp, tp)``
``("dp", "tp")`` mesh; the ranks of one TP group read the same batch (``gpt_batch(step, dp rank)``).
Its TP plan (``tp_plan``) splits each Block's MLP (``fc1`` Colwise, ``fc2`` Rowwise): the GPT's
fused ``qkv`` projection and its fixed head count in ``Block.forward`` do not take a head split.

SimpleFSDP notes: ``data_parallel`` replaces each module's parameter separately, which unties the
README GPT's tied embedding/head weight; the builder re-ties them (``lm_head._parameters["weight"]
= tok_emb._parameters["weight"]``). Its gradients are reduced as a SUM (``Partial("sum")``), so the
loss is divided by the world size before ``backward()`` to get DDP's average.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

LR = 1e-3
SEED = 0
MODELS = ("readme", "8x512")  # GPTConfig() and GPT_8X512; model_config also takes L<layers>xD<dim>

Builder = Callable[[Any, int, Any], "tuple[Any, float]"]


class SkipSystem(Exception):
    """The system cannot run here (an optional dependency is missing)."""


@dataclass(frozen=True)
class System:
    build: Builder
    doc: str
    compiled: bool = False  # built with torch.compile: the report shows Dynamo's counters
    optional: bool = False  # a failure is reported as skipped, not failed
    breakdown: bool = False  # the report breaks its step into phases
    from_baseline: bool = False  # its ranks import fsdp_compile from the ``--baseline`` checkout
    tp: int = 1  # tensor-parallel ranks per data-parallel rank (the world must be a multiple)


def model_config(model_name: str):
    """``readme``, ``8x512``, or ``L<layers>xD<dim>`` (vocab 8192, seq 128, 4 heads, ffn 4*dim,
    untied head: the sizes ``benchmarks/scaling.py`` sweeps)."""
    from fsdp_compile.testing.gpt import GPT_8X512, GPTConfig

    fixed = {"readme": GPTConfig(), "8x512": GPT_8X512}
    if model_name in fixed:
        return fixed[model_name]
    layers, dim = (int(x) for x in model_name.lstrip("L").split("xD"))
    return GPTConfig(vocab=8192, dim=dim, layers=layers, heads=4, seq=128, tied=False)


# ---- builders ---------------------------------------------------------------------------------
def _compiled(build: Builder) -> Builder:
    def compiled(model, world, cfg):
        import torch

        model, scale = build(model, world, cfg)
        return torch.compile(model), scale

    return compiled


def _ddp(model, world, cfg):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model), 1.0


def _fsdp1(model, world, cfg):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from fsdp_compile.testing.gpt import Block

    wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    return wrapped, 1.0


def _fsdp2(model, world, cfg):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, 1.0


def tp_plan():
    """The TP plan of a GPT Block: the MLP split Megatron-style."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}


def _tensor_parallel(model, world, tp):
    """``model``'s Blocks under ``tp_plan`` on the tp dim of a (world // tp, tp) mesh -> the dp mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], tp_plan())
    return mesh["dp"]


def _fsdp2_tp(tp: int) -> Builder:
    def build(model, world, cfg):
        from torch.distributed.fsdp import fully_shard

        dp_mesh = _tensor_parallel(model, world, tp)
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model, 1.0

    return build


def _fsdp_compile_tp(tp: int) -> Builder:
    def build(model, world, cfg):
        import torch

        import fsdp_compile
        from fsdp_compile.testing.gpt import Block

        dp_mesh = _tensor_parallel(model, world, tp)
        fsdp_compile.fully_shard(model, device_mesh=dp_mesh, policy={Block})
        return torch.compile(model, backend="fsdp_compile"), 1.0

    return build


def _simplefsdp(model, world, cfg):
    try:
        from torchtitan.experiments.graph_trainer.simple_fsdp import data_parallel
    except Exception as e:  # noqa: BLE001 -- any import failure means "not available"
        raise SkipSystem(f"torchtitan SimpleFSDP not importable: {type(e).__name__}: {e}") from e
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = data_parallel(model, mesh, mode="fully_shard")
    if cfg.tied:  # data_parallel distributes tok_emb.weight and lm_head.weight separately: re-tie them
        model.lm_head._parameters["weight"] = model.tok_emb._parameters["weight"]
    return model, 1.0 / world  # gradients are reduced with Partial("sum"), DDP averages


def _fsdp_compile_eager(model, world, cfg):
    import fsdp_compile
    from fsdp_compile.testing.gpt import Block

    return fsdp_compile.fully_shard(model, policy={Block}), 1.0


def _fsdp_compile(reduce_scatter: str = "", **backend_options) -> Builder:
    """fully_shard per Block, then torch.compile with ``fsdp_compile.backend(**backend_options)``;
    ``reduce_scatter="native"``: gradients reduce-scattered by the backend's own
    ``reduce_scatter_tensor`` (``fsdp_compile.testing.levers``)."""

    def build(model, world, cfg):
        import torch

        import fsdp_compile

        model, _ = _fsdp_compile_eager(model, world, cfg)
        if reduce_scatter:
            from fsdp_compile.testing.levers import set_reduce_scatter

            set_reduce_scatter(model, reduce_scatter)
        return torch.compile(model, backend=fsdp_compile.backend(**backend_options)), 1.0

    return build


def _per_block(wrap: Builder, backend: str = "inductor") -> Builder:
    """torchtitan's ``apply_compile``: every Block compiled on its own (``fullgraph=True``) before
    the data-parallel wrapper ``wrap`` is applied; the embedding and the head run eagerly."""

    def build(model, world, cfg):
        if backend == "fsdp_compile":
            import fsdp_compile

            compile_backend = fsdp_compile.backend()
        else:
            compile_backend = backend
        for block in model.blocks:
            block.compile(backend=compile_backend, fullgraph=True)
        return wrap(model, world, cfg)

    return build


_INDUCTOR_OVERLAP = {
    "reorder_for_compute_comm_overlap": True,
    "reorder_for_compute_comm_overlap_passes": [  # Inductor config.py's recommended list
        "reorder_communication_preserving_peak_memory", "sink_waits_iterative",
        "reorder_communication_preserving_peak_memory",
    ],
}


def _variant(doc: str, **options) -> System:
    """A compiled fsdp_compile one backend option away from the default."""
    return System(_fsdp_compile(**options), doc, compiled=True)


# ---- the table: name -> system (the order is the run order) ---------------------------------
SYSTEMS: dict[str, System] = {
    "ddp": System(_ddp, "torch DistributedDataParallel"),
    "ddp_compile": System(_compiled(_ddp), "torch.compile(DDP(model)) (inductor)", compiled=True, breakdown=True),
    "fsdp1": System(_fsdp1, "torch FSDP1 FullyShardedDataParallel(use_orig_params=True), auto-wrap per Block"),
    "fsdp2": System(_fsdp2, "torch FSDP2 fully_shard per Block + root, eager", breakdown=True),
    "fsdp2_compile": System(_compiled(_fsdp2), "the same, then torch.compile (inductor)", compiled=True),
    "simplefsdp_compile": System(
        _compiled(_simplefsdp),
        "torchtitan SimpleFSDP data_parallel(mode='fully_shard') on a CPU mesh, then torch.compile "
        "(inductor); skipped with the reason when torchtitan is missing or fails on this model",
        compiled=True, optional=True),
    "ddp_per_block": System(_per_block(_ddp), "DDP over Blocks each compiled on their own (inductor, fullgraph)",
                            compiled=True),
    "fsdp2_per_block": System(_per_block(_fsdp2), "FSDP2 over Blocks each compiled on their own (inductor, "
                              "fullgraph), torchtitan's order: compile, then fully_shard", compiled=True),
    "fsdp_compile_eager": System(_fsdp_compile_eager, "fsdp_compile.fully_shard(model, policy={Block})"),
    "fsdp_compile": System(_fsdp_compile(), "the same, then torch.compile(model, backend='fsdp_compile')",
                           compiled=True, breakdown=True),
    "fsdp_compile_per_block": System(
        _per_block(_fsdp_compile_eager, backend="fsdp_compile"),
        "each Block compiled on its own with backend='fsdp_compile' (fullgraph), then fully_shard; the "
        "embedding and head eager", compiled=True),
    "fsdp_compile_prefetch0": _variant("backend(prefetch=0): no all-gather prefetch", prefetch=0),
    "fsdp_compile_prefetch2": _variant("backend(prefetch=2): two gathers ahead", prefetch=2),
    "fsdp_compile_bucket1mb": _variant("backend(bucket_bytes=1 MiB): units bucketed", bucket_bytes=1 << 20),
    "fsdp_compile_aten": System(
        _fsdp_compile(copies="aten"),
        "backend(copies='aten'): Inductor generates the copy-in/copy-out code instead of one opaque op per copy",
        compiled=True, breakdown=True),
    "fsdp_compile_no_overlap": _variant(
        "backend(overlap_reductions=False): each reduction waited for right after its issue",
        overlap_reductions=False),
    "fsdp_compile_regather_root": _variant(
        "backend(keep_root_gathered=False): the root freed after forward and gathered again in backward",
        keep_root_gathered=False),
    "fsdp_compile_native_rs": _variant(
        "gradients reduce-scattered by gloo's reduce_scatter_tensor (an all-reduce of the whole input) "
        "instead of all_to_all_single + a local sum", reduce_scatter="native"),
    "fsdp_compile_inductor_reorder": _variant(
        "backend(inductor_options={'reorder_for_peak_memory': True}): Inductor's peak-memory reordering on",
        inductor_options={"reorder_for_peak_memory": True}),
    "fsdp_compile_inductor_overlap": _variant(
        "backend(inductor_options=...): Inductor's own compute/communication overlap scheduling on top of our passes",
        inductor_options=_INDUCTOR_OVERLAP),
    "fsdp2_tp2": System(
        _fsdp2_tp(2), "torch FSDP2 per Block + root over dp, each Block's MLP tensor parallel (tp 2): a (world/2, 2) mesh",
        tp=2),
    "fsdp_compile_tp2": System(
        _fsdp_compile_tp(2), "fsdp_compile.fully_shard over dp + the same TP plan and mesh, torch.compile(backend='fsdp_compile')",
        compiled=True, tp=2),
    "fsdp_compile_baseline": System(
        _fsdp_compile(),
        "fsdp_compile compiled, from the checkout given by --baseline PATH (an earlier commit), run "
        "interleaved with this one", compiled=True, from_baseline=True),
}


def build(name: str, rank: int, world: int, cfg) -> tuple[Any, float]:
    """-> (model to call, loss scale for backward) for system ``name``, on every rank, after the
    process group exists; ends with a barrier so every rank starts its first step together."""
    import torch
    import torch.distributed as dist

    from fsdp_compile.testing.gpt import GPT

    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if world % SYSTEMS[name].tp:
        raise ValueError(f"system {name!r} is tensor parallel over {SYSTEMS[name].tp} ranks; world {world} is not a multiple")
    torch.manual_seed(SEED)
    model, scale = SYSTEMS[name].build(GPT(cfg), world, cfg)
    dist.barrier()
    return model, scale


def describe() -> str:
    """One line per system, for ``--help`` and the docs."""
    width = max(map(len, SYSTEMS))
    return "\n".join(f"  {name.ljust(width)}  {system.doc}" for name, system in SYSTEMS.items())
