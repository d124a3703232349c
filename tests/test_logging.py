"""What fully_shard and the backend decide is logged under ``fsdp_compile`` (``fsdp_compile/log.py``).

One process: the model is sharded over torch's fake process group (``init_process_group("fake")``,
world 2, rank 0: collectives are traced and issued but move no data), so the passes have
collectives to place and the records carry real counts. The reference is the graph itself: the
counts the records report are checked against the compiled graphs ``sharding_info`` exposes.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.testing._internal.distributed.fake_pg import FakeStore

import fsdp_compile


def _net():
    """Units '0' and '2' (the inner Sequentials) and the root (the last Linear)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))


def _shard_compile_and_step() -> nn.Module:
    model = fsdp_compile.fully_shard(_net(), policy={nn.Sequential})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"), fullgraph=True)
    compiled(torch.ones(2, 4)).sum().backward()
    return model


@pytest.fixture
def fake_world2():
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ours(caplog) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("fsdp_compile")]


def test_fully_shard_and_the_backend_log_what_they_did(fake_world2, caplog):
    caplog.set_level(logging.DEBUG, logger="fsdp_compile")
    model = _shard_compile_and_step()

    api, comp, INFO, DEBUG = "fsdp_compile.api", "fsdp_compile.compiler", logging.INFO, logging.DEBUG
    assert _ours(caplog) == [
        (api, INFO, "fully_shard: ShardedSequential in 3 units"),
        (api, DEBUG, "fully_shard: unit '<root>': 2 params, FULL_SHARD, world 2, 5 of 10 elements on this rank"),
        (api, DEBUG, "fully_shard: unit '0': 2 params, FULL_SHARD, world 2, 10 of 20 elements on this rank"),
        (api, DEBUG, "fully_shard: unit '2': 2 params, FULL_SHARD, world 2, 10 of 20 elements on this rank"),
        (api, DEBUG, "fully_shard: the units and starting values are the same on all 2 ranks"),
        (comp, DEBUG, "hoist_markers: 0 parameter reads lifted out of checkpointed regions"),
        (comp, DEBUG, "insert_collectives: 3 gathers, units ['0', '2', '<root>']"),
        (comp, DEBUG, "keep_root_gathered: the root unit stays gathered from forward to backward"),
        (comp, DEBUG, "reshard: joint graph tagged; 6 collectives forward and backward"),
        (comp, DEBUG, "reorder: 2 all-gathers moved earlier in the forward graph (prefetch=1)"),
        (comp, INFO, "compiled the forward graph (inner=aot_eager): 3 collectives: 3 all_gather_into_tensor"),
        (comp, DEBUG, "schedule_check: the forward and joint collective schedules are the same on all 2 ranks"),
        (comp, DEBUG, "reorder: 1 all-gathers moved earlier in the backward graph (prefetch=1)"),
        (comp, DEBUG, "defer_reduce_waits: 2 reduction waits deferred in the backward graph"),
        (comp, INFO, "compiled the backward graph (inner=aot_eager): 4 collectives: "
                     "1 all_gather_into_tensor, 3 reduce_scatter_tensor"),
    ]
    # the counts are the graphs': one gather per unit forward; backward regathers unit '2' only
    # (the root stays gathered; unit '0''s input needs no gradient, so its weight is not read
    # again) and reduces every unit
    (record,) = fsdp_compile.sharding_info(model).compiled_graphs
    assert [c.kind for c in record.schedules["forward"]] == ["all_gather_into_tensor"] * 3
    assert sorted(c.kind for c in record.schedules["backward"]) == (
        ["all_gather_into_tensor"] + ["reduce_scatter_tensor"] * 3)


def test_info_alone_is_one_line_per_model_and_graph(fake_world2, caplog):
    caplog.set_level(logging.INFO, logger="fsdp_compile")
    _shard_compile_and_step()
    assert [m for _, _, m in _ours(caplog)] == [
        "fully_shard: ShardedSequential in 3 units",
        "compiled the forward graph (inner=aot_eager): 3 collectives: 3 all_gather_into_tensor",
        "compiled the backward graph (inner=aot_eager): 4 collectives: 1 all_gather_into_tensor, 3 reduce_scatter_tensor",
    ]


def test_nothing_is_logged_by_default(caplog):
    """Without configuration the library's records stay below the root logger's WARNING."""
    caplog.set_level(logging.WARNING)
    fsdp_compile.fully_shard(_net(), policy={nn.Sequential})
    assert _ours(caplog) == []


def test_the_surviving_marker_warning_is_once_per_unit_and_again_for_a_new_model():
    """``warn_once`` keys on the unit object: a second model's units warn again."""

    def run() -> list[str]:
        model = fsdp_compile.fully_shard(_net().requires_grad_(False), policy={nn.Sequential})
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(torch.ones(2, 4))
            compiled(torch.ones(2, 4))
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fsdp_compile" in str(w.message)]

    for _ in range(2):
        ours = run()
        assert sorted(m.split("'")[1] for m in ours) == ["0", "2", "<root>"]
