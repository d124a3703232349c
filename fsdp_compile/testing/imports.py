"""Import each of several modules first, in an interpreter that has imported nothing else of
``fsdp_compile``: what catches a partially initialized module (an import cycle) that only shows
when a program's first import is that module.

One interpreter imports torch once (the slow part, a few seconds), then forks one child per
module; each child imports its module first. Importing torch first does not change the order in
which ``fsdp_compile``'s modules initialize one another.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Sequence

_SCRIPT = r"""
import json, os, sys, traceback
import torch  # noqa: F401  (shared by every child; fsdp_compile is not imported here)
assert not any(m == "fsdp_compile" or m.startswith("fsdp_compile.") for m in sys.modules)
results = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            message, code = sys.modules[name].__name__, 0
        except BaseException:
            message, code = traceback.format_exc(), 1
        os.write(write, message.encode())
        os._exit(code)  # the child of a fork: no interpreter teardown of the parent's state
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    results[name] = [os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")]
print(json.dumps(results))
"""


def import_each_first(names: Sequence[str], cwd: str | None = None, timeout: float = 300) -> dict[str, tuple[int, str]]:
    """``{name: (exit code, the module's __name__ or the import's traceback)}``, each module
    imported first in a child of one interpreter that imported torch only."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(list(names))],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import_each_first: the interpreter exited {done.returncode}:\n{done.stderr[-4000:]}")
    return {name: tuple(result) for name, result in json.loads(done.stdout.strip().splitlines()[-1]).items()}
