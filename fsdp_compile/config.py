"""User-facing configuration values (plain data, no behaviour)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch


class ShardingStrategy(enum.Enum):
    """When gathered parameters are freed (the names of PyTorch FSDP1).

    FULL_SHARD: after each unit's forward; backward gathers them again.
    SHARD_GRAD_OP: after backward (kept from forward to backward, not gathered twice).
    NO_SHARD: never sharded: every rank holds full parameters, gradients are all-reduced.
    """

    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"
    NO_SHARD = "NO_SHARD"

    @classmethod
    def parse(cls, value) -> "ShardingStrategy":
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(
            f"fully_shard: strategy={value!r} is not a ShardingStrategy; "
            f"use one of {', '.join('ShardingStrategy.' + m for m in cls.__members__)}"
        )


@dataclass(frozen=True)
class MixedPrecision:
    """``param_dtype``: dtype of gathered parameters and of the forward/backward compute
    (floating-point forward inputs are cast to it). ``reduce_dtype``: dtype of the gradient
    reduction (default: ``param_dtype``). Shards, gradients seen by the optimizer and optimizer
    state keep the parameters' own dtype."""

    param_dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = None


@dataclass(frozen=True)
class CPUOffload:
    """``offload_params=True`` keeps shards (and their gradients) in CPU memory; each gather
    copies them to the compute device first."""

    offload_params: bool = False
