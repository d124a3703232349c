"""The one piece of global state: unit id -> ``Unit``.

Graph nodes carry a unit as a plain ``int`` (custom-op arguments and FX nodes cannot hold Python
objects), and this table turns it back into the ``Unit``. Ids are never reused in a process, and
entries are weak: a unit lives exactly as long as the module that owns it.
"""
from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .unit import Unit

_UNITS: "weakref.WeakValueDictionary[int, Unit]" = weakref.WeakValueDictionary()
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
