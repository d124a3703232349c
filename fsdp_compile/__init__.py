"""fsdp_compile: fully sharded data parallel training as a torch.compile transformation.

    fully_shard(model, policy={Block})
    model = torch.compile(model, backend="fsdp_compile")
"""
from .api import fully_shard, no_sync, sharded
from .compiler import backend
from .explain import ShardingInfo, explain, sharding_info
from .estimate import estimate  # the function; the package stays importable as fsdp_compile.estimate
from .failures import CollectiveError
from .config import CPUOffload, MixedPrecision, ShardingStrategy
from .full_params import (
    clip_grad_norm_,
    full_optim_state_dict,
    full_state_dict,
    load_full_optim_state_dict,
    load_full_state_dict,
    summon_full_params,
)

__all__ = [
    "CPUOffload",
    "CollectiveError",
    "backend",
    "MixedPrecision",
    "ShardingInfo",
    "ShardingStrategy",
    "clip_grad_norm_",
    "estimate",
    "explain",
    "full_optim_state_dict",
    "full_state_dict",
    "fully_shard",
    "load_full_optim_state_dict",
    "load_full_state_dict",
    "no_sync",
    "sharded",
    "sharding_info",
    "summon_full_params",
]
