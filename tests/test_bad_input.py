"""Every mistake a user can make with the public API is a clear error (the table in the
README): the exception type, and a message that names the parameter, module or option and
says what to do. Single-process cases run here (world size 1); the cross-rank one spawns 2 ranks.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fsdp_compile
from fsdp_compile import fully_shard
from fsdp_compile.testing.spawn import error_text, run_ranks


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def _net():
    return nn.Sequential(Block(), nn.ReLU(), nn.Linear(4, 2))


def _policy_not_classes():
    fully_shard(_net(), policy={Block, "Linear"})


def _sharded_twice():
    model = fully_shard(_net())
    fully_shard(model)


def _mixed_devices():
    model = _net()
    with torch.device("meta"):
        model[2] = nn.Linear(4, 2)
    fully_shard(model)


def _mixed_dtypes_in_a_unit():
    model = _net()
    model[2].double()
    fully_shard(model)


def _replaced_by_another_shape():
    model = fully_shard(_net(), policy={Block})
    model[0].fc.weight = nn.Parameter(torch.zeros(5, 4))
    model(torch.ones(1, 4))


def _load_full_missing_key():
    model = fully_shard(_net())
    state = fsdp_compile.full_state_dict(model)
    del state["2.bias"]
    fsdp_compile.load_full_state_dict(model, state)


def _load_full_extra_key():
    model = fully_shard(_net())
    fsdp_compile.load_full_state_dict(model, {**fsdp_compile.full_state_dict(model), "2.scale": torch.ones(1)})


def _load_full_wrong_shape():
    model = fully_shard(_net())
    fsdp_compile.load_full_state_dict(model, {**fsdp_compile.full_state_dict(model), "2.weight": torch.ones(3, 4)})


def _load_state_dict_wrong_shape():
    model = fully_shard(_net())
    model.load_state_dict({**_net().state_dict(), "0.fc.weight": torch.ones(4, 3)})


def _bad_strategy():
    fully_shard(_net(), strategy="HALF_SHARD")


def _bad_mixed_precision():
    fully_shard(_net(), mixed_precision=torch.bfloat16)


def _bad_param_init_fn():
    with torch.device("meta"):
        model = _net()
    fully_shard(model, param_init_fn="reset")


def _untouched_meta_parameter():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.Sequential(Scaled())
    fully_shard(model)


def _to_empty_after_fully_shard():
    fully_shard(_net()).to_empty(device="cpu")


def _bad_prefetch():
    fsdp_compile.backend(prefetch=-1)


def _bad_bucket_bytes():
    fsdp_compile.backend(bucket_bytes=0)


def _bad_inner():
    fsdp_compile.backend(inner="eager")


def _unknown_inductor_option():
    fsdp_compile.backend(inductor_options={"reorder_for_peak_memroy": False})


def _inductor_options_without_inductor():
    fsdp_compile.backend(inner="aot_eager", inductor_options={"reorder_for_peak_memory": True})


def _not_a_module():
    fully_shard(torch.ones(3))


def _bad_copies():
    fsdp_compile.backend(copies="cuda")


TABLE = [
    # (case, exception, words the message must contain)
    (_policy_not_classes, TypeError, ["policy", "'Linear'", "module classes"]),
    (_sharded_twice, ValueError, ["already sharded", "call fully_shard once"]),
    (_mixed_devices, ValueError, ["'2.weight'", "meta", "'0.fc.weight'", "one device"]),
    (_mixed_dtypes_in_a_unit, ValueError, ["mixes dtypes", "'2.weight'", "MixedPrecision"]),
    (_replaced_by_another_shape, RuntimeError, ["'0.fc.weight'", "(5, 4)", "shard"]),
    (_load_full_missing_key, RuntimeError, ["missing keys", "2.bias"]),
    (_load_full_extra_key, RuntimeError, ["unexpected keys", "2.scale"]),
    (_load_full_wrong_shape, RuntimeError, ["'2.weight'", "(3, 4)", "(2, 4)"]),
    (_load_state_dict_wrong_shape, RuntimeError, ["size mismatch for 0.fc.weight", "(4, 3)", "(4, 4)"]),
    (_bad_strategy, ValueError, ["strategy='HALF_SHARD'", "ShardingStrategy.FULL_SHARD"]),
    (_bad_mixed_precision, TypeError, ["mixed_precision", "MixedPrecision"]),
    (_bad_param_init_fn, TypeError, ["param_init_fn", "callable"]),
    (_untouched_meta_parameter, RuntimeError, ["'0.scale'", "meta device", "param_init_fn"]),
    (_to_empty_after_fully_shard, RuntimeError, ["to_empty", "param_init_fn"]),
    (_bad_prefetch, ValueError, ["prefetch=-1", ">= 0"]),
    (_bad_bucket_bytes, ValueError, ["bucket_bytes=0", "positive"]),
    (_bad_inner, ValueError, ["inner='eager'", "'inductor' or 'aot_eager'"]),
    (_unknown_inductor_option, ValueError, ["inductor_options", "'reorder_for_peak_memroy'", "torch._inductor.config"]),
    (_inductor_options_without_inductor, ValueError, ["inductor_options", "inner='aot_eager'"]),
    (_not_a_module, TypeError, ["nn.Module", "Tensor"]),
    (_bad_copies, ValueError, ["copies='cuda'", "'auto'", "aten"]),
]


@pytest.mark.parametrize("case,error,words", TABLE, ids=[c.__name__.strip("_") for c, _, _ in TABLE])
def test_bad_input_raises_a_clear_error(case, error, words):
    with pytest.raises(error) as info:
        case()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_a_model_compiled_with_another_backend_warns_once_and_stays_correct():
    torch.manual_seed(0)
    plain = _net()
    model = fully_shard(_net().requires_grad_(False), policy={Block})
    model.load_state_dict(plain.state_dict())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = compiled(torch.ones(2, 4)), compiled(torch.ones(2, 4))
    ours = [str(w.message) for w in caught if "fsdp_compile" in str(w.message)]
    assert len(ours) == 2  # once per unit: Block and the root
    assert all("backend='fsdp_compile'" in m for m in ours)
    torch.testing.assert_close(first, plain(torch.ones(2, 4)))
    torch.testing.assert_close(second, first)


def _different_models(rank: int, world: int) -> str:
    model = _net() if rank == 0 else nn.Sequential(Block(), nn.ReLU(), nn.Linear(4, 3))
    return error_text(lambda: fully_shard(model, policy={Block}))


def test_ranks_that_build_different_models_fail_at_fully_shard():
    for message in run_ranks(_different_models, 2, timeout=120):
        assert "units differ from rank" in message and "'2.weight'" in message, message


def _group_without_this_rank(rank: int, world: int) -> str:
    group = dist.new_group([0])  # every rank creates the group; rank 1 is not in it
    if rank == 0:
        return error_text(lambda: fully_shard(_net(), policy={Block}, process_group=group))
    return error_text(lambda: fully_shard(_net(), policy={Block}, process_group=group), kinds=(ValueError,))


def test_a_process_group_without_this_rank_is_rejected():
    on_member, on_other = run_ranks(_group_without_this_rank, 2, timeout=120)
    assert on_member == "no error"
    assert "not a member of process_group (ranks [0])" in on_other and "global rank 1" in on_other, on_other
