"""Session checks: no test may leave a process, a listening port or a process group behind."""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest

from fsdp_compile.testing.spawn import forkserver_pid, start_ranks_from_a_forkserver

# Ranks fork from one server that imported these once: a spawned rank would spend ~4 s of each
# multi-rank test importing them and shutting down (``fsdp_compile.testing.spawn``), and each
# rank's first Inductor compile 2-3 s more on lazy imports, a CPU probe and pattern registration
# (``fsdp_compile.testing.prepared_compilers``).
start_ranks_from_a_forkserver(
    ["torch", "torch.distributed", "torch._inductor.compile_fx", "fsdp_compile", "fsdp_compile.testing.prepared_compilers"]
)
# What is imported by now lives as long as pytest: out of the collector's generations, it is not
# rescanned by the full collections of the compiles tests run in this process (as in each rank,
# ``fsdp_compile.testing.spawn``). ``pytest_unconfigure`` hands it back for the interpreter's
# shutdown (frozen objects are never freed: nanobind, under Triton, reports them as leaks).
gc.freeze()


def pytest_unconfigure(config):
    gc.unfreeze()


# The modules test_passes.py and test_layers.py import first in a fresh interpreter: every pass
# (passes/ installs as fsdp_compile.passes) and the unit layer. One interpreter imports them all.
FIRST_IMPORTS = [
    *(f"fsdp_compile.passes.{p.stem}" for p in sorted((Path(__file__).parent.parent / "passes").glob("*.py")) if p.stem != "__init__"),
    "fsdp_compile.unit",
]


@pytest.fixture(scope="session")
def imported_first(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """``FIRST_IMPORTS`` each imported first (``import_each_first``), from an empty directory (no
    top-level ``passes`` folder on the path)."""
    from fsdp_compile.testing.imports import import_each_first

    return import_each_first(FIRST_IMPORTS, cwd=str(tmp_path_factory.mktemp("cwd")))


def _children(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` (from /proc), as (pid, command line)."""
    found, frontier = [], [pid]
    if not os.path.isdir("/proc"):
        return found
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                stats[int(entry)] = (int(fields[1]), fields[0])  # ppid, state
            except OSError:
                continue
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state) in stats.items():
            if ppid == parent and state != "Z":
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    continue
                found.append((child, cmd))
                frontier.append(child)
    return found


def _leftovers() -> list[str]:
    problems = []
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        problems.append("the test process still has a default process group")
    # Compile workers and torch's own helper processes are not ours to judge: only Python
    # processes started by multiprocessing (our ranks) or by a test's subprocess.
    for pid, cmd in _children(os.getpid()):
        if pid == forkserver_pid():  # the ranks' fork server, lives as long as pytest (its ranks do not)
            continue
        if "resource_tracker" in cmd:  # multiprocessing's own helper, lives as long as pytest
            continue
        if "multiprocessing" in cmd or "torchrun" in cmd or "train_" in cmd:
            problems.append(f"process {pid} still runs: {cmd[:160]}")
    return problems


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    deadline = time.monotonic() + 10  # ranks that just reported may still be exiting
    problems = _leftovers()
    while problems and time.monotonic() < deadline:
        time.sleep(0.5)
        problems = _leftovers()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in ["tests left these behind:", *problems]:
            (reporter.write_line if reporter else print)(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
