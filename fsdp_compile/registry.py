"""Process-wide indexes: unit id -> ``Unit``, and unit id -> its ``UnitRuntime``.

Graph nodes carry a unit as a plain ``int`` (custom-op arguments and FX nodes cannot hold Python
objects), and these tables turn it back into the ``Unit`` and (for the gather's backward, which
releases what backward gathered) its runtime record. They own nothing: ids are never reused in
a process, and entries are weak. A unit lives exactly as long as the module that owns it (its
``FSDPState``), or, a bucket unit, as the compiled graph that merged it; a runtime record as its
``FSDPState``.
"""
from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .unit import Unit
    from .unit_runtime import UnitRuntime

_UNITS: "weakref.WeakValueDictionary[int, Unit]" = weakref.WeakValueDictionary()
_RUNTIMES: "weakref.WeakValueDictionary[int, UnitRuntime]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_unit(unit: "Unit") -> int:
    unit_id = next(_NEXT_ID)
    _UNITS[unit_id] = unit
    return unit_id


def get_unit(unit_id: int) -> "Unit":
    try:
        return _UNITS[unit_id]
    except KeyError:
        raise RuntimeError(
            f"fsdp_compile: unit {unit_id} no longer exists (its module was deleted); "
            "a compiled graph outlived the model it was compiled for"
        ) from None


def live_units() -> list["Unit"]:
    """Every unit whose model is alive (bucket units included; see ``Unit.is_bucket``)."""
    return list(_UNITS.values())


def register_runtime(unit_id: int, runtime: "UnitRuntime") -> None:
    _RUNTIMES[unit_id] = runtime


def runtime_of(unit_id: int) -> "Optional[UnitRuntime]":
    """The runtime record of unit ``unit_id``; None for a bucket unit (compiled graphs only)."""
    return _RUNTIMES.get(unit_id)
