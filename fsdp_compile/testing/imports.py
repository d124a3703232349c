"""Import each of several modules first, in an interpreter that has imported nothing else of
``fsdp_compile``: what catches a partially initialized module (an import cycle) that only shows
when a program's first import is that module.

One interpreter imports, once, every module outside ``fsdp_compile`` that the named modules
import (torch, Dynamo, Inductor, Triton: the slow part, a few seconds), then forks one child per
module; each child imports its module first and runs only ``fsdp_compile``'s own module code.
Which outside modules those are, a first child finds by importing every named module and listing
what ``sys.modules`` gained. Importing them first does not change the order in which
``fsdp_compile``'s modules initialize one another.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Sequence

_SCRIPT = r"""
import json, os, sys, traceback
import torch  # noqa: F401  (shared by every child; fsdp_compile is not imported here)
names = json.loads(sys.argv[1])


def ours(module):
    return module == "fsdp_compile" or module.startswith("fsdp_compile.")


def in_a_child(body):  # [exit code, body()'s text or its traceback], in a forked child
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            message, code = body(), 0
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
    return [os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")]


def outside_modules():
    before = set(sys.modules)
    for name in names:
        try:
            __import__(name)
        except BaseException:
            pass  # its own child reports it
    return json.dumps([m for m in sys.modules if m not in before and not ours(m)])


code, found = in_a_child(outside_modules)
for module in json.loads(found) if code == 0 else []:
    try:
        __import__(module)
    except BaseException:
        pass  # e.g. a module a package registers under another name: imported by the child then
assert not any(ours(m) for m in sys.modules), "an outside module imported fsdp_compile"


def first_import(name):
    def body():
        __import__(name)
        return sys.modules[name].__name__
    return body


print(json.dumps({name: in_a_child(first_import(name)) for name in names}))
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
