"""The library's loggers and its one warn-once helper.

What fully_shard and the backend decide is logged under ``logging.getLogger("fsdp_compile")``
and its children (``fsdp_compile.api``: units built and checked; ``fsdp_compile.compiler``: each
pass and what it did per graph, buckets, graphs compiled, the cross-rank schedule check): INFO
for one line per model or graph, DEBUG for the details. Nothing is printed unless the user
configures logging: ``logging.basicConfig(level=logging.DEBUG)``,
``logging.getLogger("fsdp_compile").setLevel(logging.INFO)`` with a handler, or
``TORCH_LOGS="+fsdp_compile"`` (torch's log settings accept any importable module's name).

Warnings a user should act on stay ``warnings.warn`` (their category is part of the contract);
``warn_once`` issues one per owner and key for as long as the owner lives.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Hashable

LOGGER_NAME = "fsdp_compile"
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())


def get_logger(child: str) -> logging.Logger:
    """``fsdp_compile.<child>``."""
    return logging.getLogger(f"{LOGGER_NAME}.{child}")


# owner -> keys already warned about; an entry goes with its owner (a unit, a model)
_warned: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()


def warn_once(owner: object, key: Hashable, message: str, category: type = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn(message, category)`` the first time ``(owner, key)`` is seen; ``stacklevel``
    counts from the caller, as in ``warnings.warn``."""
    seen = _warned.setdefault(owner, set())
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
