"""Independent references, written without the library's code so that tests comparing against
them check it: what each rank holds (``torch.split`` alone, never the layout code), and what
mixed precision means (plain autograd and ``all_reduce``)."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

# Float64 results of two computations that differ only in rounding (the same ops, reassociated
# or fused): far below any change a bug makes (a 1e-7 relative change of one gradient fails it).
FLOAT64_ROUNDING = {"rtol": 1e-10, "atol": 1e-12}


def reference_shards(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's rows of ``full``: dim 0 cut in chunks of ``ceil(D / world)`` rows, in rank
    order (``torch.chunk``'s split, DTensor's ``Shard(0)``); trailing ranks may be empty."""
    c = math.ceil(full.shape[0] / world)
    pieces = list(full.split(c)) if c else []
    return pieces + [full[full.shape[0]:]] * (world - len(pieces))


def reference_shard(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``full`` (see :func:`reference_shards`)."""
    return reference_shards(full, world)[rank]


def manual_mixed_precision(
    master: nn.Module,
    param_groups: Callable[[nn.Module], list],
    micro_batches: Callable[[int], list[tuple]],
    steps: int,
    param_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What ``MixedPrecision(param_dtype, reduce_dtype=float32)`` means, by hand: ``master``'s fp32
    parameters, a ``param_dtype`` working copy refreshed from them before every step, each
    micro-batch's gradients cast to fp32 and summed (``micro_batches(step)``: the forward inputs
    of each, the last one's loss is the step's; the ones before it are ``no_sync`` micro-batches),
    then summed across every rank (``all_reduce``) and divided by the world size, and AdamW over
    ``param_groups(master)``. Returns the losses and the final fp32 parameters."""
    world = dist.get_world_size()
    work = copy.deepcopy(master).to(param_dtype)
    opt = torch.optim.AdamW(param_groups(master))
    losses = []
    for step in range(steps):
        with torch.no_grad():
            for w, m in zip(work.parameters(), master.parameters()):
                w.copy_(m)
        summed = [None] * len(list(master.parameters()))
        for batch in micro_batches(step):
            loss = work(*batch)
            loss.backward()
            for i, w in enumerate(work.parameters()):
                grad = w.grad.float()
                summed[i] = grad if summed[i] is None else summed[i] + grad
                w.grad = None
        for m, grad in zip(master.parameters(), summed):
            dist.all_reduce(grad)
            m.grad = grad / world
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in master.named_parameters()}

