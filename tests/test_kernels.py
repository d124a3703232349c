"""Tests for fsdp_compile.kernels: the three copy ops on the torch-op path and the Triton path.

Reference: plain PyTorch written here (explicit slicing loops, ``torch.cat`` of zero-padded chunks,
``torch._chunk_cat``), compared with ``torch.equal``. The eager Triton kernels run in this
process through Triton's interpreter (``triton_launches_interpreted``: the kernels stay
``@triton.jit``, only their launches are interpreted), so one ``pytest tests/`` covers both paths.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from fsdp_compile import kernels as K
from fsdp_compile.kernels import traced
from fsdp_compile.kernels._offsets import chunk_rows, padded_numels, prefix_offsets, row_numel
from fsdp_compile.testing.reference import reference_shard
from fsdp_compile.testing.triton_on_cpu import triton_launches_interpreted

def _random_shapes(count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` shapes of 1 to 4 dims, each dim 0-9 (so empty params and empty shards occur)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(count):
        ndim = int(torch.randint(1, 5, (), generator=gen))
        shapes.append(tuple(int(d) for d in torch.randint(0, 10, (ndim,), generator=gen)))
    return shapes


SHAPE_SETS = {
    "mixed": [(7, 3), (1,), (0, 5), (5, 2, 3, 2), (16,), (2, 4)],
    "divisible": [(24, 4), (48,), (8, 2, 3)],
    "one": [(3, 5)],
    "random": _random_shapes(12, seed=4),
}


# ---- independent reference ---------------------------------------------------------------------


ref_shard = reference_shard


def ref_all_gather_copy_in(shards, padded, dtype):
    out = torch.zeros(sum(padded), dtype=dtype)
    off = 0
    for s, p in zip(shards, padded):
        out[off : off + s.numel()] = s.reshape(-1).to(dtype)
        off += p
    return out


def ref_pad_rows(g: torch.Tensor, world: int) -> torch.Tensor:
    c = chunk_rows(g.shape[0], world)
    pad = torch.zeros((world * c - g.shape[0],) + tuple(g.shape[1:]), dtype=g.dtype)
    return torch.cat([g, pad]).view(world, -1)


def ref_reduce_scatter_copy_in(grads, world, dtype):
    flat = torch.cat([ref_pad_rows(g.to(dtype), world) for g in grads], dim=1).flatten()
    nonempty = [g.to(dtype) for g in grads if g.shape[0] > 0]
    if len(nonempty) == len(grads):
        assert torch.equal(flat, torch._chunk_cat(nonempty, 0, world).flatten())
    return flat


def ref_all_gather_copy_out(gathered, shapes, world):
    padded = padded_numels(shapes, world)
    offs = prefix_offsets(padded)
    total = offs[-1]
    outs = []
    for i, shape in enumerate(shapes):
        c, rn = chunk_rows(shape[0], world), row_numel(shape)
        pieces = []
        for r in range(world):
            rows = max(0, min((r + 1) * c, shape[0]) - r * c)
            start = r * total + offs[i]
            pieces.append(gathered[start : start + rows * rn].view((rows,) + tuple(shape[1:])))
        outs.append(torch.cat(pieces))
    return outs


def _three_copies(shards, gathered, grads, shapes, world, slot_dtype, rs_dtype):
    """The three public copies of one layout, as a traced function calls them."""
    padded = list(padded_numels(shapes, world))
    return (
        K.all_gather_copy_in(shards, padded, slot_dtype),
        K.all_gather_copy_out(gathered, shapes, world),
        K.reduce_scatter_copy_in(grads, world, rs_dtype),
    )


# ---- cases ---------------------------------------------------------------------------------------

CASES = [
    (shapes, world, src, dst)
    for shapes in SHAPE_SETS
    for world in (1, 2, 3, 4, 8)
    for src, dst in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]
]
TRITON_CASES = [
    ("mixed", 3, torch.float32, torch.bfloat16),
    ("mixed", 8, torch.float16, torch.float32),
    ("mixed", 2, torch.bfloat16, torch.float32),
    ("divisible", 4, torch.float32, torch.float16),
    ("one", 1, torch.float32, torch.float32),
    ("random", 3, torch.float32, torch.bfloat16),
]
# "torch": the public wrappers, which run torch's own ops on CPU tensors (kernels/cpu.py);
# "triton": the eager address-table Triton kernels (kernels/triton_kernels.py, CUDA's path),
# launched through the interpreter.
PATHS = [("torch", c) for c in CASES] + [("triton", c) for c in TRITON_CASES]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _Eager:
    """The three copies as one eager path runs them (see PATHS)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.context = triton_launches_interpreted() if self.path == "triton" else contextlib.nullcontext()
        self.context.__enter__()
        return self

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)

    def _triton(self):
        from fsdp_compile.kernels import triton_kernels

        return triton_kernels

    def all_gather_copy_in(self, shards, padded, dtype):
        if self.path == "torch":
            return K.all_gather_copy_in(shards, padded, dtype)
        return self._triton().all_gather_copy_in(shards, padded, dtype)

    def all_gather_copy_out(self, gathered, shapes, world):
        if self.path == "torch":
            return K.all_gather_copy_out(gathered, [list(s) for s in shapes], world)
        out = [torch.empty(s, dtype=gathered.dtype) for s in shapes]
        self._triton().all_gather_copy_out(gathered, shapes, world, out)
        return out

    def reduce_scatter_copy_in(self, grads, world, dtype):
        if self.path == "torch":
            return K.reduce_scatter_copy_in(grads, world, dtype)
        return self._triton().reduce_scatter_copy_in(grads, world, dtype)


def _ids(p):
    path, (shapes, world, src, dst) = p
    return f"{path}-{shapes}-W{world}-{str(src)[6:]}-{str(dst)[6:]}"


@pytest.mark.parametrize("path,case", PATHS, ids=[_ids(p) for p in PATHS])
def test_all_gather_round_trip(path, case):
    name, world, src, dst = case
    shapes = SHAPE_SETS[name]
    fulls = [torch.randn(s).to(src) for s in shapes]
    padded = list(padded_numels(shapes, world))
    slots = []
    for r in range(world):
        shards = [ref_shard(f, world, r) for f in fulls]
        if r == world - 1:
            shards = [s.t().contiguous().t() if s.dim() == 2 else s for s in shards]  # non-contiguous
        with _Eager(path) as kernels:
            slot = kernels.all_gather_copy_in(shards, padded, dst)
        assert slot.dtype == dst
        assert torch.equal(slot, ref_all_gather_copy_in(shards, padded, dst))
        slots.append(slot)
    gathered = torch.cat(slots)
    with _Eager(path) as kernels:
        outs = kernels.all_gather_copy_out(gathered, shapes, world)
    for o, f in zip(outs, fulls):
        assert o.dtype == dst and torch.equal(o, f.to(dst))
    for o, r in zip(outs, ref_all_gather_copy_out(gathered, shapes, world)):
        assert torch.equal(o, r)


def test_all_gather_copy_in_non_contiguous():
    full = torch.randn(6, 10)
    shard = full.t()[:4]  # (4, 6), non-contiguous
    other = torch.randn(3)
    slot = K.all_gather_copy_in([shard, other], [28, 5], torch.bfloat16)
    assert torch.equal(slot, ref_all_gather_copy_in([shard, other], [28, 5], torch.bfloat16))


@pytest.mark.parametrize("path,case", PATHS, ids=[_ids(p) for p in PATHS])
def test_reduce_scatter_copy_in(path, case):
    name, world, src, dst = case
    shapes = SHAPE_SETS[name]
    grads = [torch.randn(s).to(src) for s in shapes]
    with _Eager(path) as kernels:
        flat = kernels.reduce_scatter_copy_in(grads, world, dst)
    assert flat.dtype == dst and torch.equal(flat, ref_reduce_scatter_copy_in(grads, world, dst))


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_scatter_non_contiguous_grad(world):
    grads = [torch.randn(5, 7).t(), torch.randn(3)]
    flat = K.reduce_scatter_copy_in(grads, world, torch.bfloat16)
    assert torch.equal(flat, ref_reduce_scatter_copy_in(grads, world, torch.bfloat16))


# The lowerings a traced call can take (kernels/traced.py), called on real tensors and compared with
# the reference: the opaque ops, ATen, and the wrap_triton kernels of triton_traced.py (launched
# through the interpreter; the kernels stay ``@triton.jit``, as compiled graphs hold them).
LOWERING_PATHS = [("triton", c) for c in TRITON_CASES] + [(how, c) for how in ("fused", "aten") for c in CASES[::3]]


@pytest.mark.parametrize("path,case", LOWERING_PATHS, ids=[_ids(p) for p in LOWERING_PATHS])
def test_traced_lowerings_match_reference(path, case):
    name, world, src, dst = case
    shapes = SHAPE_SETS[name]
    fulls = [torch.randn(s).to(src) for s in shapes]
    fulls[-1] = fulls[-1].double()  # a list of mixed dtypes (one Triton launch: a copy body per dtype)
    padded = list(padded_numels(shapes, world))
    gathered = torch.cat([ref_all_gather_copy_in([ref_shard(f, world, r) for f in fulls], padded, dst) for r in range(world)])
    total = sum(padded)
    shards = [ref_shard(f, world, world - 1) for f in fulls]
    interpreted = triton_launches_interpreted() if path == "triton" else contextlib.nullcontext()
    with interpreted, traced.lowering_for_trace(path):
        slot = traced.all_gather_copy_in(shards, padded, dst)
        rs = traced.reduce_scatter_copy_in(fulls, world, dst)
        outs = traced.all_gather_copy_out(gathered, shapes, world)
    assert torch.equal(slot, ref_all_gather_copy_in(shards, padded, dst))
    assert torch.equal(rs, ref_reduce_scatter_copy_in(fulls, world, dst))
    assert not any(o.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr() for o in outs)
    for o, f in zip(outs, fulls):
        assert o.dtype == dst and torch.equal(o, f.to(dst))


def test_triton_copy_in_launches_once_per_max_sources_whatever_the_dtypes(monkeypatch):
    """Ten sources alternating fp32 and bf16 with ``MAX_SOURCES`` at 6: the kernel takes them
    grouped by dtype, so two launches (five fp32 and one bf16, then four bf16), each writing only
    its own segments, and the buffer equals the reference."""
    from fsdp_compile.kernels import triton_traced

    monkeypatch.setattr(triton_traced, "MAX_SOURCES", 6)
    launches = []
    real = triton_traced.many_source_kernel
    monkeypatch.setattr(triton_traced, "many_source_kernel", lambda groups: launches.append(groups) or real(groups))
    shards = [torch.randn(i % 4, 3).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(10)]
    padded = [12] * 10
    with triton_launches_interpreted():
        slot = triton_traced.all_gather_copy_in(shards, padded, torch.float32)
    assert launches == [(5, 1), (4,)]
    assert torch.equal(slot, ref_all_gather_copy_in(shards, padded, torch.float32))


def test_cuda_trace_holds_wrap_triton_launches_and_no_opaque_copy():
    """What Inductor receives on CUDA (the ``"triton"`` lowering, traced with fake tensors, so no
    GPU is needed and nothing is launched): every copy is one ``triton_kernel_wrapper_functional``
    launch and no ``fsdp_compile`` op is left, in the forward and in the backward (the autograd
    formulas call the ops again). Fake *CUDA* tensors abort a CPU-only build inside
    AOTAutograd, so the lowering is chosen by name on fake CPU tensors, with Triton compiling
    for a CUDA target (``compiling_for_cuda``)."""
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fsdp_compile.testing.triton_on_cpu import compiling_for_cuda

    shapes, world = SHAPE_SETS["mixed"], 2
    total = sum(padded_numels(shapes, world))

    def fn(shards, gathered, grads):
        slot, full, rs = _three_copies(shards, gathered, grads, shapes, world, torch.bfloat16, torch.float32)
        return slot.sum() + sum(f.sum() for f in full) + rs.sum()

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm)

    with compiling_for_cuda(), traced.lowering_for_trace("triton"):
        with FakeTensorMode(allow_non_fake_inputs=True):  # the kernel's offset table is a real constant
            fulls = [torch.empty(s, requires_grad=True) for s in shapes]
            shards = [torch.empty((chunk_rows(s[0], world),) + s[1:], requires_grad=True) for s in shapes]
            gathered = torch.empty(world * total, requires_grad=True)
            loss = aot_function(fn, fw_compiler=keep, bw_compiler=keep)(shards, gathered, fulls)
        loss.backward()  # outside the mode: the backward compile deep-copies the real table constant
    assert len(graphs) == 2
    for gm in graphs:
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert not [t for t in targets if "fsdp_compile" in t], targets
    fw_launches = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
    bw_launches = [n for n in graphs[1].graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]

    def sources(launch):
        return sum(name.startswith("src") for name in launch.kwargs["kwargs"])

    # Forward: all-gather copy-in (6 shards), copy-out (1 flat buffer), reduce-scatter copy-in
    # (6 grads). Backward: d(all_gather_copy_out) is a reduce-scatter copy-in,
    # d(reduce_scatter_copy_in) an all-gather copy-out; d(all_gather_copy_in) is slices.
    assert [sources(n) for n in fw_launches] == [6, 1, 6]
    assert sorted(sources(n) for n in bw_launches) == [1, 6]
    # Triton's TTIR (compiled for sm_80) shows each launch writes only its destination, so
    # Inductor clones no source before the launch.
    assert all(n.kwargs["tensors_to_clone"] == ["dst_ptr"] for n in fw_launches + bw_launches)
    assert not any("aten.cat" in str(n.target) for n in graphs[0].graph.nodes)


@pytest.mark.parametrize("capability", [80, 90])
def test_every_triton_kernel_compiles_to_a_cuda_binary(capability):
    """No GPU here, but Triton's whole CUDA pipeline runs on CPU (TTIR, TTGIR, LLVM IR, PTX, then
    the bundled ``ptxas`` to a cubin): the eager kernel into each destination dtype, and the traced kernel family from 1 source to ``MAX_SOURCES`` (256 pointers: 2 KiB of
    kernel arguments), one dtype or mixed, into bf16 and fp32."""
    import triton

    from fsdp_compile.kernels import triton_kernels, triton_traced
    from fsdp_compile.kernels.triton_kernels import _TL_DTYPES

    from fsdp_compile.testing.triton_on_cpu import compiling_for_cuda

    def cubin(kernel, signature, constexprs):
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        with compiling_for_cuda(capability):
            compiled = triton.compile(source, target=triton.runtime.driver.active.get_current_target())
        assert compiled.metadata.name == kernel.fn.__name__
        return compiled.asm["cubin"]

    steps = {"SEARCH_STEPS": 4, "BLOCK": triton_kernels.BLOCK}
    for dst in (torch.bfloat16, torch.float32, torch.float64):
        signature = {"table_ptr": "*i64", "num_segments": "i64"} | dict.fromkeys(["DST", "SEARCH_STEPS", "BLOCK"], "constexpr")
        constexprs = {"DST": _TL_DTYPES[dst]} | steps
        assert len(cubin(triton_kernels._segment_copy_kernel, signature, constexprs)) > 0
    for sources, dst in [(["fp32"], "bf16"), (["bf16"] * 6, "fp32"), (["fp32"] * 3 + ["bf16"] * 2 + ["fp64"], "fp32"),
                         (["fp32"] * triton_traced.MAX_SOURCES, "fp32")]:
        signature = {f"src{i}": f"*{t}" for i, t in enumerate(sources)} | {
            "dst_ptr": f"*{dst}", "table_ptr": "*i64", "num_segments": "i64", "SEARCH_STEPS": "constexpr", "BLOCK": "constexpr"}
        groups = tuple(len(list(run)) for _, run in itertools.groupby(sources))
        assert len(cubin(triton_traced.many_source_kernel(groups), signature, steps)) > 0


def test_cpu_trace_holds_one_fused_op_per_copy():
    from functorch.compile import aot_function

    shapes, world = SHAPE_SETS["mixed"], 2
    padded = list(padded_numels(shapes, world))
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    def fn(shards, grads):
        slot = K.all_gather_copy_in(shards, padded, torch.float32)
        full = K.all_gather_copy_out(torch.cat([slot, slot]), shapes, world)
        return K.reduce_scatter_copy_in([f + g for f, g in zip(full, grads)], world, torch.float32)

    fulls = [torch.randn(s) for s in shapes]
    aot_function(fn, fw_compiler=keep)([ref_shard(f, world, 0) for f in fulls], fulls)
    targets = [str(n.target) for n in graphs[0].graph.nodes if "fsdp_compile" in str(n.target)]
    assert targets == [
        "fsdp_compile.all_gather_copy_in_fused.default",
        "fsdp_compile.all_gather_copy_out_fused.default",
        "fsdp_compile.reduce_scatter_copy_in_fused.default",
    ]


# ---- autograd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3, 4])
def test_autograd_is_the_transpose(world):
    shapes = SHAPE_SETS["mixed"]
    total = sum(padded_numels(shapes, world))
    gathered = torch.randn(world * total, requires_grad=True)
    outs = K.all_gather_copy_out(gathered, shapes, world)
    go = [torch.randn(s) for s in shapes]
    (g_gathered,) = torch.autograd.grad(outs, gathered, go)
    assert torch.equal(g_gathered, ref_reduce_scatter_copy_in(go, world, torch.float32))

    grads = [torch.randn(s, requires_grad=True) for s in shapes]
    flat = K.reduce_scatter_copy_in(grads, world, torch.bfloat16)
    v = torch.randn(world * total).bfloat16()
    back = torch.autograd.grad(flat, grads, v)
    for b, r, g in zip(back, ref_all_gather_copy_out(v, shapes, world), grads):
        assert b.dtype == g.dtype and torch.equal(b, r.float())

    shards = [ref_shard(torch.randn(s), world, world - 1).requires_grad_() for s in shapes]
    padded = list(padded_numels(shapes, world))
    slot = K.all_gather_copy_in(shards, padded, torch.float32)
    w = torch.randn(total)
    back = torch.autograd.grad(slot, shards, w)
    offs = prefix_offsets(padded)
    for b, s, off in zip(back, shards, offs):
        assert torch.equal(b, w[off : off + s.numel()].view(s.shape))


def test_autograd_unused_outputs_get_zero_grad():
    shapes, world = SHAPE_SETS["mixed"], 2
    gathered = torch.randn(world * sum(padded_numels(shapes, world)), requires_grad=True)
    outs = K.all_gather_copy_out(gathered, shapes, world)
    outs[0].sum().backward()
    expect = ref_reduce_scatter_copy_in([torch.ones(shapes[0])] + [torch.zeros(s) for s in shapes[1:]], world, torch.float32)
    assert torch.equal(gathered.grad, expect)


def test_gradcheck_float64():
    shapes, world = [(3, 2), (2,)], 2
    padded = list(padded_numels(shapes, world))
    total = sum(padded)
    gathered = torch.randn(world * total, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: tuple(K.all_gather_copy_out(g, shapes, world)), (gathered,))
    grads = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)
    assert torch.autograd.gradcheck(lambda *g: K.reduce_scatter_copy_in(list(g), world, torch.float64), grads)
    shards = tuple(ref_shard(g.detach(), world, 1).clone().requires_grad_() for g in grads)
    assert torch.autograd.gradcheck(lambda *s: K.all_gather_copy_in(list(s), padded, torch.float64), shards)


# ---- fake tensors and torch.compile ------------------------------------------------------------


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes, world = SHAPE_SETS["mixed"], 3
    padded = list(padded_numels(shapes, world))
    with FakeTensorMode():
        fulls = [torch.empty(s) for s in shapes]
        slot = K.all_gather_copy_in([ref_shard(f, world, 2) for f in fulls], padded, torch.bfloat16)
        assert slot.shape == (sum(padded),) and slot.dtype == torch.bfloat16
        outs = K.all_gather_copy_out(torch.empty(world * sum(padded)), shapes, world)
        assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]
        assert K.reduce_scatter_copy_in(fulls, world, torch.float16).shape == (world * sum(padded),)


@pytest.mark.parametrize("lowering", ["fused", "aten"])
def test_torch_compile_aot_eager_matches_eager(lowering):
    torch._dynamo.reset()
    shapes, world = SHAPE_SETS["mixed"], 3
    total = sum(padded_numels(shapes, world))

    def fn(shards, gathered, grads):
        slot, full, rs = _three_copies(shards, gathered, grads, shapes, world, torch.bfloat16, torch.bfloat16)
        return slot, full, rs, sum(f.sum() for f in full)

    def inputs():
        torch.manual_seed(1)
        fulls = [torch.randn(s) for s in shapes]
        return [ref_shard(f, world, 1) for f in fulls], torch.randn(world * total), fulls

    eager_in, comp_in = inputs(), inputs()
    expect = fn(*eager_in)
    with traced.lowering_for_trace(lowering):
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*comp_in)
    assert torch.equal(expect[0], got[0]) and torch.equal(expect[2], got[2]) and torch.equal(expect[3], got[3])
    assert all(torch.equal(a, b) for a, b in zip(expect[1], got[1]))


@pytest.mark.parametrize("lowering", ["fused", "aten"])
def test_torch_compile_backward(lowering):
    torch._dynamo.reset()
    shapes, world = SHAPE_SETS["mixed"], 2
    total = sum(padded_numels(shapes, world))

    def fn(gathered):
        return sum((o * o).sum() for o in K.all_gather_copy_out(gathered, shapes, world))

    g1 = torch.randn(world * total, requires_grad=True)
    g2 = g1.detach().clone().requires_grad_()
    fn(g1).backward()
    with traced.lowering_for_trace(lowering):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(g2).backward()
    assert torch.equal(g1.grad, g2.grad)


# ---- dispatch ------------------------------------------------------------------------------------


def test_eager_kernels_by_device_and_size():
    """CPU tensors and tiny CUDA buckets take torch's ops; CUDA buckets from TRITON_MIN_NUMEL on
    take the one-launch Triton kernel (no process-wide switch: the device decides)."""
    from fsdp_compile.kernels import cpu, triton_kernels

    assert K.eager_kernels(torch.device("cpu"), 1 << 30) is cpu
    assert K.eager_kernels(torch.device("cuda"), K.TRITON_MIN_NUMEL - 1) is cpu
    assert K.eager_kernels(torch.device("cuda"), K.TRITON_MIN_NUMEL) is triton_kernels


def test_bad_layouts_raise_naming_the_tensor():
    with pytest.raises(ValueError, match="shard 1 has 9 elements > padded numel 8"):
        K.all_gather_copy_in([torch.randn(4), torch.randn(9)], [4, 8], torch.float32)
    with pytest.raises(ValueError, match="got 2 shards and 1 padded numels"):
        K.all_gather_copy_in([torch.randn(4), torch.randn(9)], [4], torch.float32)
    with pytest.raises(ValueError, match="gathered has 7 elements, layout of 2 params at world size 2 needs 4"):
        K.all_gather_copy_out(torch.randn(7), [[2], [2]], 2)
    with pytest.raises(ValueError, match="param 1 is 0-D"):
        K.reduce_scatter_copy_in([torch.randn(3), torch.tensor(1.0)], 2, torch.float32)


def test_eager_calls_go_through_the_dispatcher():
    """Profilers, FLOP counters and tracers (torch-function and dispatch modes) see each copy as
    one ``fsdp_compile`` op, and inputs that need grad get a ``grad_fn``."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Dispatches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    shards = [torch.randn(3, 2, requires_grad=True)]
    assert K.all_gather_copy_in(shards, [8], torch.float32).grad_fn is not None
    assert K.reduce_scatter_copy_in(shards, 2, torch.float32).grad_fn is not None
    shards[0].requires_grad_(False)
    for mode in (Functions, Dispatches):
        seen.clear()
        with mode():
            slot = K.all_gather_copy_in(shards, [8], torch.float32)
        assert any("all_gather_copy_in" in name for name in seen), (mode, seen)
        assert torch.equal(slot, ref_all_gather_copy_in(shards, [8], torch.float32))


def test_eager_triton_copies_take_one_launch_for_mixed_dtypes(monkeypatch):
    """The address-table kernel branches on each segment's source dtype: fp32, bf16, fp16 and
    fp64 shards (and gradients) are packed by one launch each way, equal to the reference."""
    from fsdp_compile.kernels import triton_kernels

    launches = []
    real = triton_kernels._launch
    monkeypatch.setattr(triton_kernels, "_launch", lambda *a, **k: launches.append(a[0]) or real(*a, **k))
    shapes, world = SHAPE_SETS["mixed"], 3
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    fulls = [torch.randn(s).to(dtypes[i % 4]) for i, s in enumerate(shapes)]
    shards = [ref_shard(f, world, 1) for f in fulls]
    padded = list(padded_numels(shapes, world))
    with triton_launches_interpreted():
        slot = triton_kernels.all_gather_copy_in(shards, padded, torch.bfloat16)
        packed = triton_kernels.reduce_scatter_copy_in(fulls, world, torch.float32)
    assert len(launches) == 2
    assert torch.equal(slot, ref_all_gather_copy_in(shards, padded, torch.bfloat16))
    assert torch.equal(packed, ref_reduce_scatter_copy_in(fulls, world, torch.float32))
