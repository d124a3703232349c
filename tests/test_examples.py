"""The Llama example runs as users launch it: under torchrun, and as a plain script that spawns
its own ranks. Each run is a real subprocess with a timeout."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_compile.testing.spawn import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_llama.py"


def _run(cmd: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _check(out: str, steps: int, mode: str, world: int = 2, strategy: str = "FULL_SHARD") -> None:
    assert f"{world} ranks on cpu (gloo), {strategy}, {mode}" in out, out
    memory = " ".join([r"(\d+)MiB"] * world)
    lines = re.findall(rf"^step +(\d+) +loss ([\d.]+) +\d+ tokens/s +memory/rank {memory}$", out, re.M)
    assert [int(s) for s, *_ in lines] == list(range(steps)), out
    assert f"done: {steps} steps" in out


@pytest.mark.parametrize("inner", [
    "aot_eager",
    # the example's default inner compiler; the default suite compiles Hugging Face Llama with
    # Inductor in tests/test_hf_models.py
    pytest.param("inductor", marks=[pytest.mark.inductor, pytest.mark.slow]),
])
def test_torchrun_form_trains_compiled(tmp_path, inner):
    """Under torchrun, compiled, saving a DCP checkpoint; 2 of its decoder layers instead of 4,
    which halves what Dynamo traces and the inner compiler compiles."""
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    flags = [] if inner == "inductor" else ["--inner", inner]
    out = _run([*launcher, "--nproc-per-node", "2", "--master-port", str(free_port()), str(EXAMPLE),
                "--steps", "2", "--layers", "2", *flags, "--checkpoint-dir", str(tmp_path / "ckpt")])
    _check(out, 2, f"compiled ({inner})")
    assert (tmp_path / "ckpt" / ".metadata").exists()


def test_plain_python_form_spawns_two_ranks():
    out = _run([sys.executable, str(EXAMPLE), "--steps", "3", "--eager", "--activation-checkpointing"])
    _check(out, 3, "eager")
    assert "activation checkpointing" in out


@pytest.mark.slow  # 4 ranks on 2 cores, ~35 s; tests/test_hybrid_shard.py covers hybrid sharding in the default suite
def test_torchrun_hybrid_sharding_on_4_ranks(tmp_path):
    """``--hsdp 2`` under torchrun: a 2 x 2 (replicate, shard) mesh, compiled, checkpointed."""
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = _run([*launcher, "--nproc-per-node", "4", "--master-port", str(free_port()), str(EXAMPLE),
                "--steps", "2", "--hsdp", "2", "--inner", "aot_eager", "--checkpoint-dir", str(tmp_path / "ckpt")])
    _check(out, 2, "compiled (aot_eager), 2 replicas x 2 shards", world=4, strategy="HYBRID_SHARD")
    assert (tmp_path / "ckpt" / ".metadata").exists()


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step +\d+ +loss ([\d.]+) ", out, re.M)]


@pytest.mark.slow  # 4 and 8 ranks on 2 cores; tests/test_tensor_parallel.py covers FSDP over TP in the default suite
@pytest.mark.parametrize("flags,world,layout", [
    (["--tp", "2"], 4, "dp 2 x tp 2"),
    (["--hsdp", "2", "--tp", "2"], 8, "2 replicas x 2 shards, dp 4 x tp 2"),
], ids=["dp2xtp2", "hsdp2x2xtp2"])
def test_torchrun_tensor_parallel_trains(flags, world, layout):
    """``--tp 2`` under torchrun (a dp 2 x tp 2 mesh) and ``--hsdp 2 --tp 2`` (2 replicas x 2
    shards x tp 2): Llama's attention and MLP tensor parallel, compiled; the loss goes down."""
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = _run([*launcher, "--nproc-per-node", str(world), "--master-port", str(free_port()), str(EXAMPLE),
                "--steps", "6", *flags, "--inner", "aot_eager"])
    strategy = "HYBRID_SHARD" if "--hsdp" in flags else "FULL_SHARD"
    _check(out, 6, f"compiled (aot_eager), {layout}", world=world, strategy=strategy)
    losses = _losses(out)
    assert min(losses[-2:]) < losses[0] - 0.1, losses
