"""Levers that benchmarks and tests pull on a sharded model, outside the public API: choices the
library makes itself and that a measurement needs to compare with their alternative. Each reads
and writes the model through ``fsdp_compile.sharding_info``; none changes what a user's model
does unless called."""
from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from ..explain import sharding_info

REDUCE_SCATTER_KINDS = ("native", "all_to_all")


def set_reduce_scatter(model: nn.Module, kind: str) -> None:
    """Make every unit of ``model`` reduce-scatter its gradients with ``kind``: ``"native"``
    (the backend's ``reduce_scatter_tensor``; on gloo an all-reduce of the whole input) or
    ``"all_to_all"`` (``all_to_all_single`` and a local sum, the gloo default;
    ``fsdp_compile/collectives.py``). Call it before the first step: compiled graphs bake the
    choice in."""
    if kind not in REDUCE_SCATTER_KINDS:
        raise ValueError(f"set_reduce_scatter: kind must be one of {REDUCE_SCATTER_KINDS}, got {kind!r}")
    for unit in sharding_info(model).units:
        unit.spec = replace(unit.spec, reduce_scatter=kind)
