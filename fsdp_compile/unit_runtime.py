"""One unit's runtime state: what it holds beyond its shards, and the legal changes to it.

``FSDPState`` (runtime.py) owns one ``UnitRuntime`` per unit (``FSDPState.runtime``) and is the
only one that decides when a unit gathers or reshards; this record is where those decisions
land, and every change of it goes through a method here that checks the change is legal. A
``Unit`` (unit.py) is the unit's data and collectives; it holds none of this.

The gathered tensors a unit can hold, eagerly (:class:`Gathered`; several at once: a FULL_SHARD
unit partly checkpointed is regathered for backward *and* for a recompute)::

    SHARDED --first read in its module's forward--> FORWARD --its module's forward ends--> SHARDED
    SHARDED --backward unpacks a saved full parameter--> BACKWARD --its gradients reduced--> SHARDED
    SHARDED --an activation-checkpointing recompute reads it--> RECOMPUTE --reduced--> SHARDED

and its ``no_sync`` gradients: ``accumulator`` (the gradient sink leaf, made on entering
``no_sync``) and ``pending`` (the packed gradients it collected, consumed by the next gather
that reduces: eagerly ``take_pending``, compiled ``drop_pending_taken``).

Under ``torch.compile`` ``FSDPState.read`` and ``post_forward`` write ``full`` directly (a
Dynamo side effect, replayed after the graph): plain attribute writes, which Dynamo traces
without a graph break; the checked transitions below are for eager code.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .unit import Unit


class Gathered(enum.Enum):
    """What a unit's gathered tensors are held for (``UnitRuntime.held``)."""

    FORWARD = "gathered for its module's forward"  # ``full``: from its first read to its post-forward
    BACKWARD = "regathered for backward"  # ``bw_full``: FULL_SHARD, a saved full parameter unpacked
    RECOMPUTE = "gathered for a recompute"  # ``recompute_full``: activation checkpointing


class UnitStateError(RuntimeError):
    """An internal error: the runtime asked a unit for a change its state does not allow."""


class UnitRuntime:
    """The runtime state of ``unit`` (module docstring). Plain attributes, so Dynamo traces writes."""

    def __init__(self, unit: "Unit"):
        self.unit = unit
        self.full: Optional[list[torch.Tensor]] = None  # Gathered.FORWARD
        self.bw_full: Optional[list[torch.Tensor]] = None  # Gathered.BACKWARD
        self.recompute_full: Optional[list[torch.Tensor]] = None  # Gathered.RECOMPUTE
        self.accumulator: Optional[torch.Tensor] = None  # no_sync gradient sink (a leaf)
        self.pending: Optional[torch.Tensor] = None  # packed gradients held back by no_sync

    def __repr__(self) -> str:
        held = ", ".join(g.name for g in self.held) or "SHARDED"
        return f"UnitRuntime({self.unit.name or '<root>'!r}, {held})"

    @property
    def held(self) -> tuple[Gathered, ...]:
        """What the unit is gathered for now (empty: SHARDED, it holds only its shards)."""
        slots = ((Gathered.FORWARD, self.full), (Gathered.BACKWARD, self.bw_full), (Gathered.RECOMPUTE, self.recompute_full))
        return tuple(kind for kind, value in slots if value is not None)

    def _illegal(self, change: str) -> UnitStateError:
        held = ", ".join(g.value for g in self.held) or "sharded"
        return UnitStateError(
            f"fsdp_compile internal error: unit {self.unit.name or '<root>'!r} cannot be {change} "
            f"while it is {held}; please report this with the model and call sequence"
        )

    # ---- gathered tensors ------------------------------------------------------------------
    def _hold(self, slot: str, fulls: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Keep ``fulls`` in the empty ``slot``; a second gather for the same use is illegal."""
        if getattr(self, slot) is not None:
            raise self._illegal(f"gathered for {what} again")
        setattr(self, slot, fulls)
        return fulls

    def gathered_for_forward(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """SHARDED -> FORWARD (its first read inside its module's forward)."""
        return self._hold("full", fulls, "its forward")

    def resharded(self) -> bool:
        """FORWARD -> SHARDED (its module's forward ended); False when it was not gathered."""
        if self.full is None:
            return False
        self.full = None
        return True

    def regathered_for_backward(self) -> list[torch.Tensor]:
        """The unit gathered for backward, once until its gradients are reduced (-> BACKWARD)."""
        if self.bw_full is None:
            with torch.no_grad():
                self.bw_full = self.unit.all_gather(self.unit.local_shards())
        return self.bw_full

    def gathered_for_recompute(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """-> RECOMPUTE (the first read of a recompute); released by ``after_backward_use``."""
        return self._hold("recompute_full", fulls, "a recompute")

    def after_backward_use(self) -> None:
        """Its gradients are reduced (or the backward ended): BACKWARD, RECOMPUTE -> SHARDED."""
        self.bw_full = None
        self.recompute_full = None

    # ---- no_sync gradients -----------------------------------------------------------------
    def ensure_accumulator(self) -> None:
        """Create the no_sync gradient sink: a zero-stride leaf whose gradient is the packed full
        gradients; a hook moves each accumulated gradient into ``pending``."""
        if self.accumulator is not None:
            return
        unit, spec = self.unit, self.unit.spec
        numel = unit.layout.local_numel * (1 if spec.replicated or not spec.communicates else spec.world_size)
        leaf = torch.zeros((), dtype=unit.reduce_dtype, device=unit.compute_device).expand(numel)
        leaf.requires_grad_(True)
        leaf.register_post_accumulate_grad_hook(self._hold_pending)
        self.accumulator = leaf

    def _hold_pending(self, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        self.pending = grad.detach() if self.pending is None else self.pending + grad

    def take_pending(self) -> Optional[torch.Tensor]:
        """An eager gather that reduces the pending gradients consumed them (its graph holds them)."""
        pending, self.pending = self.pending, None
        return pending

    def drop_pending_taken(self, taken: set[int]) -> None:
        """A compiled graph consumed ``pending`` if it was one of its inputs (``taken``: their ids)."""
        if self.pending is not None and id(self.pending) in taken:
            self.pending = None

    def after_rebuild(self, device: torch.device) -> None:
        """The unit's flat buffer was rebuilt in another dtype/device (``Unit.rebuild_flat``):
        the next no_sync makes a new accumulator; pending gradients move to ``device``."""
        self.accumulator = None
        if self.pending is not None:
            self.pending = self.pending.to(device=device)
