"""The training loop the tests (and users' own checks) share: forward, backward, step, zero."""
from __future__ import annotations

from typing import Any, Callable

import torch

from fsdp_compile import torch_private


def train_steps(
    forward: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    inputs: Callable[[int], Any],
    steps: int,
    start: int = 0,
    no_recompiles_after_first: bool = False,
) -> list[float]:
    """Run steps ``start .. start+steps-1`` and return each step's loss.

    ``inputs(step)`` gives the forward's inputs: a tuple (positional), a dict (keywords) or one
    tensor. ``forward`` returns the loss, or an object with a ``.loss`` (Hugging Face outputs).
    With ``no_recompiles_after_first``, any Dynamo recompile after the first step raises.
    """
    losses = []
    try:
        for step in range(start, start + steps):
            args = inputs(step)
            if isinstance(args, dict):
                out = forward(**args)
            elif isinstance(args, tuple):
                out = forward(*args)
            else:
                out = forward(args)
            loss = getattr(out, "loss", out)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if no_recompiles_after_first:
                torch_private.error_on_recompile(True)
    finally:
        if no_recompiles_after_first:
            torch_private.error_on_recompile(False)
    return losses


def optimizer_step(forward: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *args) -> torch.Tensor:
    """One step on one batch: ``forward(*args)`` is the loss; backward, step, zero the
    gradients. Returns the loss, detached (its own dtype, for exact comparisons)."""
    loss = forward(*args)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()
