"""The fused C++ copy kernels (``csrc/copy_segments.cpp``), built on first use.

Owns: building/loading the extension and the decision to use it. ``cpu.py`` asks
:func:`module` and falls back to its torch-op code when it returns ``None``.

Why C++: a copy op over N tensors written with torch ops pays Python work per tensor (a view,
a check, ~1 us each); at 1000 tensors of 64 KB that is as long as the copy itself. The extension
takes the tensor list in one call, builds the segment list in C++ and copies with
``torch.get_num_threads()`` threads.

The build uses ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja, which Inductor on
CPU needs anyway); it is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), so only the first process on a machine compiles (~30 s).
``FSDP_COMPILE_CPU_EXT=0`` skips it; a failed build warns once and the torch-op path is used.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

SOURCE = Path(__file__).with_name("csrc") / "copy_segments.cpp"


def enabled() -> bool:
    return os.environ.get("FSDP_COMPILE_CPU_EXT", "1") != "0"


@functools.cache
def _build() -> Optional[ModuleType]:
    try:
        from torch.utils.cpp_extension import load

        return load(name="fsdp_compile_copy_segments", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as error:  # noqa: BLE001 -- any build failure means "use the torch-op path"
        warnings.warn(
            f"fsdp_compile: the fused C++ copy kernels did not build ({type(error).__name__}: {error}); "
            "copies use the slower torch-op path. Set FSDP_COMPILE_CPU_EXT=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def module() -> Optional[ModuleType]:
    """The extension, or ``None`` when disabled or unbuildable."""
    return _build() if enabled() else None
