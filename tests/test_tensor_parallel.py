"""FSDP over tensor parallelism on 4 real gloo ranks: a 2 x 2 ``("dp", "tp")`` mesh.

Ranks [[0, 1], [2, 3]]: TP groups {0, 1} and {2, 3} (torch's ``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel``), dp groups {0, 2} and {1, 3} (``fully_shard``). The
ranks of one TP group read the same batch; the two dp ranks read different ones. Reference: the
same model in one process, float64, on the global batch (the mean of the dp ranks' losses),
and torch's FSDP2 with the same TP plan (float64, and bf16 mixed precision). One spawn runs
every world-4 case (training, FSDP2, a DCP checkpoint); each case returns plain data or its
traceback, and the parent asserts. World 2 loads the checkpoint at other layouts and checks bad
input; world 8 (slow) runs HSDP + TP; world-4 spawns of their own (slow) compile with Inductor,
compile the bf16 mixed-precision case, and compile the combinations of levers (no_sync with
checkpointing; sequence parallelism with SHARD_GRAD_OP, no_sync, checkpointing and loss_parallel).
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn as nn
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, loss_parallel, parallelize_module,
)
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.graphs import REDUCE_SCATTER
from fsdp_compile.testing.reference import FLOAT64_ROUNDING
from fsdp_compile.testing.spawn import case_result, error_text, run_case, run_ranks

# the world-4 spawn (every case, several compiles on 4 ranks) runs in the setup of the first test
# that asks for it: the module's timeout is the spawn's
pytestmark = pytest.mark.timeout(900)

DP, TP = 2, 2
VOCAB, DIM, HEADS, HIDDEN, SEQ, BATCH = 23, 8, 2, 16, 6, 2
STEPS = 3
MODES = ("eager", "aot_eager")
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")


class Block(nn.Module):
    """Attention-like and MLP halves; TP splits heads and hidden features, so the module code
    derives its local head count from the width it is given."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.norm1(x)
        head_dim = DIM // HEADS

        def heads(t):
            return t.view(b, s, -1, head_dim).transpose(1, 2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    checkpointed = False  # activation checkpointing of every block (non-reentrant)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


PLAN = {
    "q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
    "fc1": ColwiseParallel(), "fc2": RowwiseParallel(),
}


def _sp_plan():
    """Sequence parallelism: activations between blocks are sharded over the sequence (dim 1)
    on the tp dim; the norms run on sequence shards (their weights Replicate() DTensors)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import SequenceParallel

    seq = Shard(1)
    return {
        "norm1": SequenceParallel(), "norm2": SequenceParallel(),
        "q": ColwiseParallel(input_layouts=seq), "k": ColwiseParallel(input_layouts=seq),
        "v": ColwiseParallel(input_layouts=seq), "fc1": ColwiseParallel(input_layouts=seq),
        "o": RowwiseParallel(output_layouts=seq, use_local_output=False),
        "fc2": RowwiseParallel(output_layouts=seq, use_local_output=False),
    }, {
        "blocks.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(seq,)),
        "norm": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True),
    }


def _seeded() -> Model:
    torch.manual_seed(0)
    return Model().double()


def _batch(step: int, dp_rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + dp_rank)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


@functools.lru_cache(maxsize=None)
def _mesh(dp: int, tp: int):
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _tp_model(mesh, sequence_parallel=False, parallel_loss=False):
    """The seeded model under the TP plan; ``parallel_loss``: the head Colwise with Shard(-1)
    DTensor logits, for ``loss_parallel``'s cross entropy over vocabulary shards."""
    model = _seeded()
    block_plan, model_plan = _sp_plan() if sequence_parallel else (PLAN, {})
    if parallel_loss:
        model_plan = {**model_plan, "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], block_plan)
    parallelize_module(model, mesh["tp"], model_plan)
    return model


def _full_params(model):
    """Global parameters by name, from the state dict (DTensors on the (dp, tp) mesh)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _compile(model, mode):
    if mode == "eager":
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=fsdp_compile.backend(inner=mode))


MAX_NORM = 0.5  # below the gradients' norm at every step: clipping scales them


def _train(forward, model, dp_rank, clip=None, steps=STEPS, accumulate=None, context=contextlib.nullcontext):
    """AdamW steps; ``clip(model)`` (a clip_grad_norm_) before each step; returns the losses,
    the clip's total norms and the optimizer. ``accumulate``: from that step on, each step first
    accumulates a micro-batch inside ``no_sync``. Each forward and backward runs inside
    ``context()`` (``loss_parallel``: its loss is a replicated DTensor)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(steps):
        if accumulate is not None and step >= accumulate:
            with fsdp_compile.no_sync(model), context():
                forward(*_batch(step, dp_rank, micro=1)).backward()
        with context():
            loss = forward(*_batch(step, dp_rank))
            loss.backward()
        if clip is not None:
            norms.append(clip(model).detach())
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().detach() if isinstance(loss, DTensor) else loss.detach())
    return torch.stack(losses), norms and torch.stack(norms), opt


def _ours_clip(model):
    return fsdp_compile.clip_grad_norm_(model, MAX_NORM)


def reference(clip: bool, steps=STEPS, dp=DP, accumulate=None):
    """One process, the global batch: each step's loss per dp rank, the clipped gradients'
    total norms, and the final parameters. ``accumulate``: as ``_train``'s."""
    model = _seeded()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(steps):
        if accumulate is not None and step >= accumulate:
            torch.stack([model(*_batch(step, d, micro=1)) for d in range(dp)]).mean().backward()
        per_rank = [model(*_batch(step, d)) for d in range(dp)]
        torch.stack(per_rank).mean().backward()
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
        losses.append(torch.stack(per_rank).detach())
    return torch.stack(losses), norms and torch.stack(norms), {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- world 4 -----------------------------------------------------------------------------------
BF16 = fsdp_compile.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _ours(mesh, strategy="FULL_SHARD", sequence_parallel=False, parallel_loss=False, mixed_precision=None):
    model = _tp_model(mesh, sequence_parallel, parallel_loss)
    if mixed_precision is not None:
        model = model.float()  # float32 shards, bf16 compute
    return fully_shard(model, device_mesh=mesh["dp"], policy={Block}, strategy=strategy, mixed_precision=mixed_precision)


def _run(model, mode, dp_rank, clip=_ours_clip, accumulate=None, context=contextlib.nullcontext, run=None):
    """Train ``model`` (through ``run``, its compiled form, when given) and report the results."""
    weight = model.blocks[0].q.weight
    run = _compile(model, mode) if run is None else run
    losses, norms, _ = _train(run, model, dp_rank, clip, accumulate=accumulate, context=context)
    out = {
        "losses": losses,
        "norms": norms,
        "params": _full_params(model),
        "same_object": model.blocks[0].q.weight is weight,
        "placements": {k: str(v.placements) for k, v in model.state_dict().items() if isinstance(v, DTensor)},
    }
    if mode != "eager":
        info = fsdp_compile.sharding_info(model)
        out["schedules"] = [dict(r.schedules) for r in info.compiled_graphs]
        out["explain"] = fsdp_compile.explain(run)
    return out


_UNCLIPPED: dict = {}  # parity()'s compiled FULL_SHARD model trained again unclipped, for fsdp2_reference


def _restore(model, initial):
    with torch.no_grad():
        for p, value in zip(model.parameters(), initial):
            p.copy_(value)


def parity(rank, eager=True, sp_levers=False, compiled_no_sync=False):
    """Every case eagerly (``eager``); compiled (aot_eager), the FULL_SHARD model's graph. The
    slow run's spawn adds, without the eager cases: ``compiled_no_sync``, that model
    checkpointed with a no_sync micro-batch in every step (two more graphs); ``sp_levers``, the
    two graphs of a model that pulls every lever at once (sequence parallelism, SHARD_GRAD_OP,
    no_sync, checkpointing, loss_parallel)."""
    mesh = _mesh(DP, TP)
    dp_rank = mesh.get_local_rank("dp")
    out = {}
    if eager:
        out.update({(strategy, "eager"): _run(_ours(mesh, strategy), "eager", dp_rank) for strategy in STRATEGIES})
        out[("sequence_parallel", "eager")] = _run(_ours(mesh, sequence_parallel=True), "eager", dp_rank)
        model = _ours(mesh)
        model.checkpointed = True
        out[("no_sync_checkpointed", "eager")] = _run(model, "eager", dp_rank, accumulate=1)
        out[("loss_parallel", "eager")] = _run(_ours(mesh, parallel_loss=True), "eager", dp_rank, context=loss_parallel)
    # One compiled FULL_SHARD model, trained from its starting values: clipped (the first-step
    # graph); unclipped through that same graph, for fsdp2_reference; then (compiled_no_sync)
    # every block checkpointed with a no_sync micro-batch in every step (two more graphs: the
    # no_sync micro-batch's and the sync one's after it).
    model = _ours(mesh)
    initial = [p.detach().clone() for p in model.parameters()]
    run = _compile(model, "aot_eager")
    out[("FULL_SHARD", "aot_eager")] = _run(model, "aot_eager", dp_rank, run=run)
    _restore(model, initial)
    _UNCLIPPED["FULL_SHARD"] = _run(model, "aot_eager", dp_rank, clip=None, run=run)
    if compiled_no_sync:
        _restore(model, initial)
        model.checkpointed = True
        out[("no_sync_checkpointed", "aot_eager")] = _run(model, "aot_eager", dp_rank, accumulate=0, run=run)
    if sp_levers:
        # compiled (one compile for many levers): sequence parallelism, SHARD_GRAD_OP, no_sync,
        # checkpointing and loss_parallel at once; a no_sync micro-batch in every step, so two
        # graphs (the no_sync one and the sync one after it; the first-step graph without
        # pending gradients is FULL_SHARD's above)
        model = _ours(mesh, "SHARD_GRAD_OP", sequence_parallel=True, parallel_loss=True)
        model.checkpointed = True
        out[("sp_levers", "aot_eager")] = _run(model, "aot_eager", dp_rank, accumulate=0, context=loss_parallel)
    return out


def fsdp2_reference(rank):
    """torch's FSDP2 + the same TP plan on the same mesh, and ours, unclipped."""
    from torch.distributed.fsdp import fully_shard as fsdp2_fully_shard

    mesh = _mesh(DP, TP)
    dp_rank = mesh.get_local_rank("dp")
    model = _tp_model(mesh)
    for block in model.blocks:
        fsdp2_fully_shard(block, mesh=mesh["dp"])
    fsdp2_fully_shard(model, mesh=mesh["dp"])
    losses, _, _ = _train(model, model, dp_rank)
    fsdp2 = {"losses": losses, "params": _full_params(model)}
    return {"fsdp2": fsdp2, "ours": _UNCLIPPED["FULL_SHARD"]}  # run by parity(), on its compiled graph


def fsdp2_mixed_precision(rank, modes=("eager",)):
    """bf16 compute, fp32 reduction: torch's FSDP2 (MixedPrecisionPolicy) + the same TP plan on
    the same mesh, and ours (MixedPrecision) in each of ``modes``, unclipped."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as fsdp2_fully_shard

    mesh = _mesh(DP, TP)
    dp_rank = mesh.get_local_rank("dp")
    model = _tp_model(mesh).float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fsdp2_fully_shard(block, mesh=mesh["dp"], mp_policy=policy)
    fsdp2_fully_shard(model, mesh=mesh["dp"], mp_policy=policy)
    losses, _, _ = _train(model, model, dp_rank)
    out = {"fsdp2": {"losses": losses, "params": _full_params(model)}}
    for mode in modes:
        out[mode] = _run(_ours(mesh, mixed_precision=BF16), mode, dp_rank, clip=None)
    return out


def compiled_combinations(rank, world):
    """``parity``'s compiled combinations of levers, in a world-4 spawn of its own (slow)."""
    torch.set_num_threads(1)
    return {"parity": run_case(lambda: parity(rank, eager=False, sp_levers=True, compiled_no_sync=True))}


@pytest.fixture(scope="module")
def world4_combinations():
    return run_ranks(compiled_combinations, 4, timeout=900)


def fsdp2_mixed_precision_compiled(rank, world):
    """``fsdp2_mixed_precision`` compiled (aot_eager), in a world-4 spawn of its own (slow)."""
    torch.set_num_threads(1)
    return {"fsdp2_bf16": run_case(lambda: fsdp2_mixed_precision(rank, modes=("aot_eager",)))}


def _loaded(model, path):
    """``model`` (and a fresh AdamW) loaded from the DCP checkpoint at ``path`` through
    get/set_state_dict; returns their full state dicts."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return fsdp_compile.full_state_dict(model), fsdp_compile.full_optim_state_dict(model, opt)


def save_checkpoint(rank, path):
    """Train at dp 2 x tp 2, save with DCP; then load it back at dp 4 x tp 1 (same ranks)."""
    mesh = _mesh(DP, TP)
    model = _ours(mesh)
    _, _, opt = _train(model, model, mesh.get_local_rank("dp"))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    saved = (fsdp_compile.full_state_dict(model), fsdp_compile.full_optim_state_dict(model, opt))
    optim_placements = {
        k: str(v.placements) for k, v in osd["state"]["blocks.0.q.weight"].items() if isinstance(v, DTensor)
    }
    return {"saved": saved, "optim_placements": optim_placements, "dp4_tp1": _loaded(_ours(_mesh(4, 1)), path)}


def load_checkpoint(rank, world, path, layout):
    def run():
        if layout == "1d":
            return _loaded(fully_shard(_seeded(), policy={Block}), path)
        return _loaded(_ours(_mesh(*layout)), path)

    return run_case(run)


def world4_cases(rank, world, tmp):
    torch.set_num_threads(1)
    return {
        "parity": run_case(lambda: parity(rank)),
        "fsdp2": run_case(lambda: fsdp2_reference(rank)),
        "fsdp2_bf16": run_case(lambda: fsdp2_mixed_precision(rank)),
        "checkpoint": run_case(lambda: save_checkpoint(rank, f"{tmp}/ckpt")),
    }


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    return tmp, run_ranks(world4_cases, 4, str(tmp), timeout=900)


@pytest.fixture(scope="module")
def world4_results(world4):
    return world4[1]


@pytest.fixture(scope="module")
def ref():
    return {
        "clipped": reference(clip=True), "unclipped": reference(clip=False),
        "accumulated": reference(clip=True, accumulate=1), "accumulated_from_0": reference(clip=True, accumulate=0),
    }


def _assert_params(got, want, what):
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert_close(got[name], value, msg=lambda m: f"{what}: {name}: {m}")


def test_fsdp_over_tp_trains_like_one_process_on_the_global_batch_eager_and_compiled(world4_results, ref):
    """Both strategies eagerly and FULL_SHARD compiled (aot_eager), with clip_grad_norm_ at every
    step: losses, total norms (over dp and tp) and final parameters equal the one-process
    float64 reference. Compiled SHARD_GRAD_OP: in the run with every lever (slow)
    (test_compiled_sequence_parallel_with_shard_grad_op_no_sync_checkpointing_and_loss_parallel)."""
    ref_losses, ref_norms, ref_params = ref["clipped"]
    assert (ref_norms > MAX_NORM).all()  # every step clips
    for rank, result in enumerate(world4_results):
        out = case_result(result["parity"])
        for strategy, mode in (("FULL_SHARD", "eager"), ("FULL_SHARD", "aot_eager"), ("SHARD_GRAD_OP", "eager")):
            got = out[(strategy, mode)]
            what = f"rank {rank} {strategy} {mode}"
            assert_close(got["losses"], ref_losses[:, rank // TP], msg=lambda m: f"{what} losses: {m}")
            assert_close(got["norms"], ref_norms, msg=lambda m: f"{what} norms: {m}")
            _assert_params(got["params"], ref_params, what)
            assert got["same_object"], what


def _assert_case_matches(world4_results, reference, case: str, label: str, modes=MODES) -> list[dict]:
    """Every rank's run of ``case`` in ``modes`` equals ``reference`` (losses of its dp rank's
    batch, clipped norms, final parameters); returns those runs."""
    ref_losses, ref_norms, ref_params = reference
    runs = []
    for rank, result in enumerate(world4_results):
        out = case_result(result["parity"])
        for mode in modes:
            got = out[(case, mode)]
            what = f"rank {rank} {label} {mode}"
            assert_close(got["losses"], ref_losses[:, rank // TP], msg=lambda m: f"{what} losses: {m}")
            assert_close(got["norms"], ref_norms, msg=lambda m: f"{what} norms: {m}")
            _assert_params(got["params"], ref_params, what)
            runs.append(got)
    return runs


def test_sequence_parallel_trains_like_one_process_eager_and_compiled(world4_results, ref):
    """Eagerly on its own; compiled in the run with every lever (slow), whose parity
    test_compiled_sequence_parallel_with_shard_grad_op_no_sync_checkpointing_and_loss_parallel
    asserts."""
    runs = _assert_case_matches(world4_results, ref["clipped"], "sequence_parallel", "sequence parallel", modes=("eager",))
    for got in runs:
        assert got["placements"]["blocks.0.norm1.weight"] == "(Shard(dim=0), Replicate())"


def test_no_sync_and_activation_checkpointing_with_tp_train_like_one_process(world4_results, ref):
    """Every block checkpointed, FULL_SHARD, eagerly with no_sync micro-batches from step 1 on
    (compiled: the slow test below, and with SHARD_GRAD_OP and sequence parallelism in
    test_compiled_sequence_parallel_with_shard_grad_op_no_sync_checkpointing_and_loss_parallel)."""
    _assert_case_matches(world4_results, ref["accumulated"], "no_sync_checkpointed", "no_sync + checkpointing", modes=("eager",))


@pytest.mark.slow  # world4_combinations: a world-4 spawn of its own
def test_compiled_no_sync_and_activation_checkpointing_with_tp_train_like_one_process(world4_combinations, ref):
    """The compiled FULL_SHARD model, recompiled for checkpointing, with a no_sync micro-batch in
    every step."""
    runs = _assert_case_matches(
        world4_combinations, ref["accumulated_from_0"], "no_sync_checkpointed",
        "no_sync + checkpointing", modes=("aot_eager",),
    )
    for got in runs:
        # the uncheckpointed first-step graph, then the checkpointed no_sync and sync graphs: their
        # backward recomputes Rowwise all-reduces of the forward beside its own 8, and reduces
        # (on the shard group) only in the sync graph
        first, no_sync, sync = got["schedules"]
        assert _counts(first["backward"], "tp") == {"all_reduce": 8}, first
        for graph, reductions in ((no_sync, 0), (sync, 3)):
            assert _counts(graph["backward"], "tp")["all_reduce"] > 8, graph
            assert _counts(graph["backward"], "shard").get(REDUCE_SCATTER, 0) == reductions, graph


def test_loss_parallel_over_a_colwise_head_trains_like_one_process(world4_results, ref):
    """``loss_parallel()`` around forward and backward: the head's Shard(-1) DTensor logits go
    into cross entropy over vocabulary shards; the loss is a replicated DTensor; clipped."""
    for got in _assert_case_matches(world4_results, ref["clipped"], "loss_parallel", "loss_parallel", modes=("eager",)):
        assert got["placements"]["head.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"


@pytest.mark.slow  # world4_combinations; each lever is compiled on its own in the default run
def test_compiled_sequence_parallel_with_shard_grad_op_no_sync_checkpointing_and_loss_parallel(world4_combinations, ref):
    """Every lever at once in one compiled run (aot_eager): sequence parallelism, SHARD_GRAD_OP,
    a no_sync micro-batch in every step, every block checkpointed, loss_parallel."""
    for got in _assert_case_matches(
        world4_combinations, ref["accumulated_from_0"], "sp_levers", "SP + SHARD_GRAD_OP + no_sync + checkpointing + loss_parallel",
        modes=("aot_eager",),
    ):
        assert got["placements"]["head.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"


def _assert_bf16_matches_fsdp2_and_float64(results, ref, modes):
    """MixedPrecision(bf16, reduce fp32) equals FSDP2's MixedPrecisionPolicy with the same TP
    plan on the same mesh bit for bit (bf16 gathers and TP collectives, fp32 reductions, the same
    casts) in each of ``modes``; the float64 reference agrees at bf16 tolerance (parameters: Adam's
    steps of lr 1e-2 turn bf16 rounding of small gradients into updates of up to 2e-2)."""
    ref_losses, _, ref_params = ref["unclipped"]
    for rank, result in enumerate(results):
        out = case_result(result["fsdp2_bf16"])
        fsdp2 = out["fsdp2"]
        for mode in modes:
            got, what = out[mode], f"rank {rank} bf16 {mode}"
            assert_close(got["losses"], fsdp2["losses"], rtol=0, atol=0, msg=lambda m: f"{what} vs fsdp2 losses: {m}")
            for name, value in fsdp2["params"].items():
                assert got["params"][name].dtype == torch.float32, (what, name)
                assert_close(got["params"][name], value, rtol=0, atol=0, msg=lambda m: f"{what} vs fsdp2 {name}: {m}")
            assert_close(got["losses"].double(), ref_losses[:, rank // TP], rtol=1.6e-2, atol=1e-5,
                         msg=lambda m: f"{what} vs float64 losses: {m}")
            for name, value in ref_params.items():
                assert_close(got["params"][name].double(), value, rtol=0, atol=4e-2,
                             msg=lambda m: f"{what} vs float64 {name}: {m}")


def test_bf16_mixed_precision_over_tp_equals_torch_fsdp2_and_the_float64_reference(world4_results, ref):
    """Eagerly (``_assert_bf16_matches_fsdp2_and_float64``); compiled: the slow test below."""
    _assert_bf16_matches_fsdp2_and_float64(world4_results, ref, modes=("eager",))


@pytest.mark.slow  # a world-4 spawn of its own for one more compile
def test_compiled_bf16_mixed_precision_over_tp_equals_torch_fsdp2_and_the_float64_reference(ref):
    results = run_ranks(fsdp2_mixed_precision_compiled, 4, timeout=900)
    _assert_bf16_matches_fsdp2_and_float64(results, ref, modes=("aot_eager",))


def test_fsdp_over_tp_equals_torch_fsdp2_with_the_same_plan(world4_results, ref):
    ref_losses, _, ref_params = ref["unclipped"]
    for rank, result in enumerate(world4_results):
        out = case_result(result["fsdp2"])
        for who in ("fsdp2", "ours"):
            what = f"rank {rank} {who}"
            assert_close(out[who]["losses"], ref_losses[:, rank // TP], msg=lambda m: f"{what} losses: {m}")
            _assert_params(out[who]["params"], ref_params, what)
        assert len(out["ours"]["schedules"]) == 1, out["ours"]["schedules"]  # not recompiled for the rerun
        assert_close(out["ours"]["losses"], out["fsdp2"]["losses"], rtol=0, atol=1e-12)
        _assert_params(out["ours"]["params"], out["fsdp2"]["params"], f"rank {rank} ours vs fsdp2")


def test_state_dict_values_are_dtensors_on_the_dp_tp_mesh_with_fsdp2s_placements(world4_results):
    placements = case_result(world4_results[0]["parity"])[("FULL_SHARD", "eager")]["placements"]
    assert placements["blocks.0.q.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["blocks.0.q.bias"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["blocks.0.o.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["blocks.0.o.bias"] == "(Shard(dim=0), Replicate())"
    assert placements["emb.weight"] == "(Shard(dim=0),)"


def _assert_state(got, saved, what):
    model, optim = got
    _assert_params(model, saved[0], what)
    assert optim["state"].keys() == saved[1]["state"].keys(), what
    for key, per_param in saved[1]["state"].items():
        for k, v in per_param.items():
            assert_close(optim["state"][key][k], v, rtol=0, atol=0, msg=lambda m: f"{what} {key}.{k}: {m}")


def test_checkpoint_saved_at_dp2_tp2_loads_exactly_at_dp4_tp1(world4_results):
    out = case_result(world4_results[0]["checkpoint"])
    assert out["optim_placements"] == {
        "exp_avg": "(_StridedShard(dim=0, sf=2), Shard(dim=0))", "exp_avg_sq": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
    }
    for rank, result in enumerate(world4_results):
        out = case_result(result["checkpoint"])
        _assert_state(out["dp4_tp1"], out["saved"], f"rank {rank} dp 4 x tp 1")


@pytest.mark.parametrize("layout", [(1, 2), "1d"], ids=["dp1_tp2", "world2_1d"])
def test_checkpoint_saved_at_dp2_tp2_loads_exactly_at_world_2(world4, layout):
    tmp, results = world4
    saved = case_result(results[0]["checkpoint"])["saved"]
    for rank, got in enumerate(run_ranks(load_checkpoint, 2, f"{tmp}/ckpt", layout, timeout=300)):
        _assert_state(case_result(got), saved, f"world 2 {layout} rank {rank}")


def test_checkpoint_saved_at_dp2_tp2_loads_into_an_unsharded_model(world4):
    tmp, results = world4
    saved = case_result(results[0]["checkpoint"])["saved"][0]
    model = _seeded()
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=f"{tmp}/ckpt")
    model.load_state_dict(state)
    _assert_params(model.state_dict(), saved, "unsharded")


def test_explain_lists_the_dp_and_tp_groups_and_the_collectives_on_each(world4_results):
    text = case_result(world4_results[0]["parity"])[("FULL_SHARD", "aot_eager")]["explain"]
    assert "shard group (mesh dim 'dp'): global ranks [0, 2]" in text, text
    assert "tp group (tensor parallel, its collectives from DTensor): global ranks [0, 1]" in text, text
    assert "on tp group" in text and "on shard group" in text, text
    assert "blocks.0.q.weight (8, 8) -> 2 rows/rank of its TP-local (4, 8)" in text, text
    # per phase, each group's collectives by kind: 3 units' gathers beside the Rowwise all-reduces
    assert "    by group: shard: 3 all-gather; tp: 4 all-reduce\n" in text, text
    assert "    by group: shard: 2 all-gather, 3 all-to-all; tp: 8 all-reduce\n" in text, text


# ---- bad input (world 2) -------------------------------------------------------------------------
def bad_inputs(rank, world):
    from torch.distributed.tensor import Partial

    def separate_roots():
        tp_root = init_device_mesh("cpu", (1, 2), mesh_dim_names=("x", "tp"))
        dp_root = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "y"))
        model = _tp_model(tp_root)
        return fully_shard(model, device_mesh=dp_root["dp"], policy={Block})

    def two_tp_meshes():
        root = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("dp", "tp", "ep"))
        model = _seeded()
        parallelize_module(model.blocks[0], root["tp"], {"q": ColwiseParallel()})
        parallelize_module(model.blocks[0], root["ep"], {"fc1": ColwiseParallel()})
        return fully_shard(model, device_mesh=root["dp"], policy={Block})

    def partial():
        mesh = _mesh(1, 2)
        model = _seeded()
        fc = model.blocks[1].fc2
        fc.weight = nn.Parameter(DTensor.from_local(fc.weight.detach(), mesh["tp"], [Partial()]))
        return fully_shard(model, device_mesh=mesh["dp"], policy={Block})

    def plan_after():
        mesh = _mesh(1, 2)
        model = fully_shard(_seeded(), device_mesh=mesh["dp"], policy={Block})
        parallelize_module(model.blocks[0], mesh["tp"], PLAN)

    def process_group():
        return fully_shard(_tp_model(_mesh(1, 2)), policy={Block})

    cases = {"roots": separate_roots, "meshes": two_tp_meshes, "partial": partial,
             "plan_after": plan_after, "process_group": process_group}
    return {name: error_text(fn, (ValueError, RuntimeError)) for name, fn in cases.items()}


def test_bad_input_raises_naming_the_parameter_and_the_fix():
    errors = run_ranks(bad_inputs, 2, timeout=120)[0]
    assert "'blocks.0.q.weight'" in errors["roots"] and "same root mesh" in errors["roots"], errors["roots"]
    assert "mixes parameters on different tensor-parallel meshes" in errors["meshes"], errors["meshes"]
    assert "'blocks.0.q.weight'" in errors["meshes"] and "'blocks.0.fc1.weight'" in errors["meshes"]
    assert "'blocks.1.fc2.weight'" in errors["partial"] and "Partial" in errors["partial"], errors["partial"]
    assert "'blocks.0.q.weight'" in errors["plan_after"] and "before fully_shard" in errors["plan_after"], errors["plan_after"]
    assert "'blocks.0.q.weight'" in errors["process_group"] and "device_mesh=mesh['dp']" in errors["process_group"]


def test_compiled_graphs_hold_dtensors_tp_collectives_beside_ours(world4_results):
    """Per unit (the root and two blocks) our collectives on the dp ("shard") group exactly as
    without TP; DTensor's TP all-reduces on the "tp" group beside them (Rowwise outputs in
    forward, Colwise input gradients in backward), named by role so every rank compares them.
    SHARD_GRAD_OP's (no backward gathers): in the sequence-parallel graphs' test below."""
    for rank, result in enumerate(world4_results):
        out = case_result(result["parity"])
        (schedules,) = out[("FULL_SHARD", "aot_eager")]["schedules"]
        what = (rank, schedules)
        forward, backward = schedules["forward"], schedules["backward"]
        assert {c.group for c in forward + backward} == {"shard", "tp"}, what
        assert [c.kind for c in forward if c.group == "shard"] == ["all_gather_into_tensor"] * 3, what
        assert [c.kind for c in forward if c.group == "tp"] == ["all_reduce"] * 4, what  # o, fc2 per block
        ours = [c.kind for c in backward if c.group == "shard"]
        assert ours.count(REDUCE_SCATTER) == 3, what
        assert ours.count("all_gather_into_tensor") == 2, what  # the blocks' regathers
        tp = [c.kind for c in backward if c.group == "tp"]
        assert tp and set(tp) == {"all_reduce"}, what


def _counts(schedule, group):
    kinds = [c.kind for c in schedule if c.group == group]
    return {kind: kinds.count(kind) for kind in kinds}


@pytest.mark.slow  # world4_combinations
def test_compiled_sequence_parallel_graphs_hold_its_gathers_and_reduce_scatters_beside_ours(world4_combinations):
    """Sequence parallelism + SHARD_GRAD_OP + no_sync + loss_parallel, per graph (the no_sync
    micro-batch's, the sync micro-batch's after it): ours on the dp
    ("shard") group as without TP -- 3 unit gathers in forward, none in backward, one
    reduce-scatter per unit except under no_sync; DTensor's on the tp group beside them -- in
    forward 5 sequence all-gathers (into attention and MLP of 2 blocks, and before the final
    norm), 4 reduce-scatters (out of o and fc2) and loss_parallel's 3 all-reduces."""
    for rank, result in enumerate(world4_combinations):
        graphs = case_result(result["parity"])[("sp_levers", "aot_eager")]["schedules"]
        assert len(graphs) == 2, (rank, graphs)
        for number, schedules in enumerate(graphs):
            forward, backward = schedules["forward"], schedules["backward"]
            what = (rank, number, schedules)
            assert {c.group for c in forward + backward} == {"shard", "tp"}, what
            assert [c.kind for c in forward if c.group == "shard"] == ["all_gather_into_tensor"] * 3, what
            reductions = 0 if number == 0 else 3
            assert [c.kind for c in backward if c.group == "shard"] == [REDUCE_SCATTER] * reductions, what
            assert _counts(forward, "tp") == {"all_gather_into_tensor": 5, "reduce_scatter_tensor": 4, "all_reduce": 3}, what
            assert _counts(backward, "tp") == {"all_reduce": 9, "all_gather_into_tensor": 9, "reduce_scatter_tensor": 10}, what


# ---- Inductor (world 4, slow) --------------------------------------------------------------------
def inductor_fullgraph(rank, world):
    """``torch.compile(model, backend="fsdp_compile", fullgraph=True)``: Inductor compiles the
    graphs that hold our collectives and DTensor's."""
    torch.set_num_threads(1)
    mesh = _mesh(DP, TP)
    model = _ours(mesh)
    torch._dynamo.reset()
    run = torch.compile(model, backend="fsdp_compile", fullgraph=True)
    losses, norms, _ = _train(run, model, mesh.get_local_rank("dp"), _ours_clip)
    info = fsdp_compile.sharding_info(model)
    return {"losses": losses, "norms": norms, "params": _full_params(model),
            "inner": [r.inner for r in info.compiled_graphs]}


@pytest.mark.inductor
@pytest.mark.slow  # Inductor's C++ compiles on 4 ranks: ~190 s on a loaded 2-core machine
def test_inductor_fullgraph_over_tp_equals_the_float64_reference_to_rounding(ref):
    ref_losses, ref_norms, ref_params = ref["clipped"]
    for rank, got in enumerate(run_ranks(inductor_fullgraph, 4, timeout=1200)):
        what = f"rank {rank} inductor"
        assert got["inner"] == ["inductor"], what
        assert_close(got["losses"], ref_losses[:, rank // TP], **FLOAT64_ROUNDING, msg=lambda m: f"{what} losses: {m}")
        assert_close(got["norms"], ref_norms, **FLOAT64_ROUNDING, msg=lambda m: f"{what} norms: {m}")
        for name, value in ref_params.items():
            assert_close(got["params"][name], value, **FLOAT64_ROUNDING, msg=lambda m: f"{what} {name}: {m}")


# ---- HSDP + TP (world 8) -------------------------------------------------------------------------
def hsdp_tp(rank, world):
    """2 replicas x 2 shards x tp 2: FSDP's mesh is mesh["replicate", "shard"], TP's mesh["tp"]."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
    dp_rank = mesh.get_local_rank("replicate") * 2 + mesh.get_local_rank("shard")
    out = {}
    for mode in MODES:
        model = fully_shard(_tp_model(mesh), device_mesh=mesh["replicate", "shard"], policy={Block})
        got = _run(model, mode, dp_rank)
        got["strategies"] = {u.strategy.name for u in fsdp_compile.sharding_info(model).units}
        out[mode] = got
    return out


@pytest.mark.slow
def test_hsdp_over_tp_on_a_2x2x2_mesh_trains_like_one_process():
    ref_losses, ref_norms, ref_params = reference(clip=True, dp=4)
    for rank, out in enumerate(run_ranks(hsdp_tp, 8, timeout=1200)):
        for mode in MODES:
            got = out[mode]
            what = f"rank {rank} HSDP + TP {mode}"
            assert got["strategies"] == {"HYBRID_SHARD"}, what
            assert_close(got["losses"], ref_losses[:, rank // TP], msg=lambda m: f"{what} losses: {m}")
            assert_close(got["norms"], ref_norms, msg=lambda m: f"{what} norms: {m}")
            _assert_params(got["params"], ref_params, what)
            assert got["placements"]["blocks.0.q.weight"] == "(Replicate(), _StridedShard(dim=0, sf=2), Shard(dim=0))"
