"""Graph breaks inside a unit, on 2 gloo ranks: Hugging Face MoE decoders with
``experts_implementation="eager"`` loop over ``nonzero()`` results (a data-dependent break, a
different loop count per rank, experts that get no tokens on a rank). Tiny Mixtral, Qwen2-MoE,
Qwen3-MoE and DeepSeek-V3 built from configs, float64, ranks given different data, trained
eagerly and compiled (``aot_eager``; Mixtral also with Inductor) against
``DDP(find_unused_parameters=True)``. Each unit is gathered once per forward however many graphs
its forward is split into (counted at run time), and its gradients are reduced once per backward.

tests/test_graph_break_gathers.py has a small hand-written model with ``.item()`` and a Python
branch on a tensor value inside a unit (the default suite).
"""
from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import fsdp_compile
from fsdp_compile.testing.memory import profile_step
from fsdp_compile.testing.spawn import run_ranks

VOCAB = 64
STEPS = 3
INDUCTOR_TOL = dict(rtol=1e-5, atol=1e-5)  # HF's float32 rotary cos/sin (see test_hf_models)


def build(family: str):
    """(tiny model, decoder-layer class) with the eager expert loop."""
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, experts_implementation="eager",
    )
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

        config = MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
        return MixtralForCausalLM(config), MixtralDecoderLayer
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer

        config = Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2, **common,
        )
        return Qwen2MoeForCausalLM(config), Qwen2MoeDecoderLayer
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

        config = Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
            **common,
        )
        return Qwen3MoeForCausalLM(config), Qwen3MoeDecoderLayer
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    common["num_key_value_heads"] = 4  # multi-head latent attention: no grouped keys
    config = DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common,
    )
    return DeepseekV3ForCausalLM(config), DeepseekV3DecoderLayer


def _collectives(fn) -> dict:
    """The all-gathers and reductions (gloo: all-to-alls) that ran in ``fn()``, eager or compiled,
    as the profiler saw them (a ``TorchDispatchMode`` would make Dynamo run uncompiled frames
    eagerly instead). The lockstep check's exchange is an ``all_gather_single``, not counted."""
    gather, reductions = "_c10d_functional::all_gather_into_tensor", (
        "_c10d_functional::reduce_scatter_tensor", "_c10d_functional::all_to_all_single")
    _, names = profile_step(fn, count_prefixes=(gather, *reductions))
    return {"all_gather": names.get(gather, 0), "reduce": sum(names.get(n, 0) for n in reductions)}


def _ids(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10 * step + rank))


def _train(model, forward, rank, count_last=False):
    from torch._dynamo.utils import counters

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, counts = [], None
    for step in range(STEPS):
        ids = _ids(step, rank)
        if count_last and step == STEPS - 1:
            graphs, out = counters["stats"]["unique_graphs"], []
            forward_counts = _collectives(lambda: out.append(forward(input_ids=ids, labels=ids, use_cache=False).loss))
            loss = out[0]
            backward_counts = _collectives(loss.backward)
            counts = {"forward": forward_counts, "backward": backward_counts["reduce"],
                      "compiled": counters["stats"]["unique_graphs"] - graphs}
        else:
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, counts


def moe_cases(rank: int, world: int, family: str, modes: tuple) -> dict:
    torch.manual_seed(0)
    base, layer_cls = build(family)
    base = base.double()
    ddp = DDP(copy.deepcopy(base), find_unused_parameters=True)
    losses, _ = _train(ddp, ddp, rank)
    out = {"ddp": {"losses": losses, "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}}}
    for mode in modes:
        try:
            model = fsdp_compile.fully_shard(copy.deepcopy(base), policy={layer_cls})
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            backend = {"aot_eager": fsdp_compile.backend(inner="aot_eager"), "inductor": "fsdp_compile"}.get(mode)
            forward = model if backend is None else torch.compile(model, backend=backend)
            losses, counts = _train(model, forward, rank, count_last=True)
            info = fsdp_compile.sharding_info(model)
            out[mode] = {
                "losses": losses,
                "params": fsdp_compile.full_state_dict(model),
                "counts": counts,
                "units": len(info.units),
                "gathered": [g.unit_id for record in info.compiled_graphs for g in record.gathers],
                "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            }
        except Exception:  # noqa: BLE001 -- reported by the parent
            out[mode] = traceback.format_exc()
    return out


FAMILIES = {
    "mixtral": ("eager", "aot_eager", "inductor"),
    "qwen2_moe": ("eager", "aot_eager"),
    "qwen3_moe": ("eager", "aot_eager"),
    "deepseek_v3": ("eager", "aot_eager"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, run_ranks(moe_cases, 2, request.param, FAMILIES[request.param], timeout=1500)


@pytest.mark.slow  # 3-5 minutes per family on the shared 2-core machine (Mixtral with Inductor: more)
def test_eager_moe_loop_trains_like_ddp_gathering_each_unit_once(family):
    name, results = family
    for mode in FAMILIES[name]:
        tol = INDUCTOR_TOL if mode == "inductor" else {}
        for rank, r in enumerate(results):
            got = r[mode]
            assert not isinstance(got, str), f"{name} {mode} rank {rank} failed:\n{got}"
            assert_close(got["losses"], r["ddp"]["losses"], **tol)
            for param, value in r["ddp"]["params"].items():
                assert_close(got["params"][param], value, **tol, msg=f"{name} {mode} {param}")
            assert got["counts"]["backward"] == got["units"], (mode, got["counts"])  # one reduction per unit
            if mode != "eager":
                assert got["graph_breaks"] > 0  # the expert loop breaks the graph
            # one all-gather per unit per forward, however many graphs a unit's forward is split
            # into (the last step may still compile a graph for a new expert-loop shape)
            assert got["counts"]["forward"]["all_gather"] == got["units"], (mode, got["counts"])
            assert got["counts"]["forward"]["reduce"] == 0, (mode, got["counts"])
