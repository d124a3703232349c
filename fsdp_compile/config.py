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
    HYBRID_SHARD / HYBRID_SHARD_ZERO2: FULL_SHARD / SHARD_GRAD_OP inside each group of the
    ``"shard"`` dim of a 2-D device mesh, replicated across its ``"replicate"`` dim: gradients
    are reduce-scattered on the shard group, then all-reduced on the replicate group.
    """

    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"
    NO_SHARD = "NO_SHARD"
    HYBRID_SHARD = "HYBRID_SHARD"
    HYBRID_SHARD_ZERO2 = "HYBRID_SHARD_ZERO2"

    @property
    def reshards_after_forward(self) -> bool:
        """Gathered parameters are freed after forward and gathered again for backward."""
        return self in (ShardingStrategy.FULL_SHARD, ShardingStrategy.HYBRID_SHARD)

    @property
    def hybrid(self) -> bool:
        return self in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy.HYBRID_SHARD_ZERO2)

    def kept_after_forward(self) -> "ShardingStrategy":
        """The same sharding without the reshard after forward: FULL_SHARD -> SHARD_GRAD_OP,
        HYBRID_SHARD -> HYBRID_SHARD_ZERO2 (what the compiled root unit uses, as FSDP2's root)."""
        return {
            ShardingStrategy.FULL_SHARD: ShardingStrategy.SHARD_GRAD_OP,
            ShardingStrategy.HYBRID_SHARD: ShardingStrategy.HYBRID_SHARD_ZERO2,
        }.get(self, self)

    def as_hybrid(self) -> "ShardingStrategy":
        """The strategy on a 2-D (replicate, shard) mesh: FULL_SHARD -> HYBRID_SHARD,
        SHARD_GRAD_OP -> HYBRID_SHARD_ZERO2 (FSDP2's "HSDP" when given a 2-D mesh)."""
        return {
            ShardingStrategy.FULL_SHARD: ShardingStrategy.HYBRID_SHARD,
            ShardingStrategy.SHARD_GRAD_OP: ShardingStrategy.HYBRID_SHARD_ZERO2,
        }.get(self, self)

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
