"""``fsdp_compile.testing.check_parity`` and its command line, on 2 gloo ranks.

- On the GPT of ``fsdp_compile.testing.gpt`` (tiny config, ``inner="aot_eager"``) every strategy
  and mode matches DDP, and the report has one row per (step, strategy, mode).
- With mixed precision it compares compiled with eager and says so.
- Models with a bug injected here must be caught, naming the first diverging step, the
  strategy/mode and the parameter: a forward that changes under ``torch.compiler.is_compiling()``
  from step 2 on (compiled only), and a weight gradient scaled only when the module is sharded
  (eager and compiled, step 0, loss still equal).
- Lambdas / nested functions are refused with a TypeError before anything is spawned.
- Parameter elements with noise-level gradients (which AdamW amplifies) are not compared; a
  parameter update bug with exact gradients is.
- The command line (``python -m fsdp_compile.testing``) exits 0 on the good model, 1 on a buggy
  one and 2 on a usage error.

The model and batch functions below are module-level: the spawned ranks import them by name.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsdp_compile import MixedPrecision
from fsdp_compile.params import is_sharded
from fsdp_compile.testing import ParityReport, check_parity
from fsdp_compile.testing.gpt import GPT, Block, GPTConfig, gpt_batch

TINY = GPTConfig(vocab=32, dim=16, layers=2, heads=2, seq=8)
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
REPO = Path(__file__).resolve().parents[1]


# ---- models the ranks import --------------------------------------------------------------------
def tiny_gpt() -> nn.Module:
    return GPT(TINY)


def tiny_gpt_batch(step: int, rank: int) -> tuple:
    return gpt_batch(step, rank, TINY, batch=2)


class Regressor(nn.Module):
    """Two Linear layers and an MSE loss: ``forward(x, y, flag) -> loss``."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 8)
        self.lin2 = nn.Linear(8, 1)

    def hidden(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin1(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.lin2(self.hidden(x, flag)).squeeze(-1), y)


class CompiledOnlyBug(Regressor):
    """Correct eagerly; compiled, adds ``0.1 * flag`` to the hidden layer (flag is 1 from step 2)."""

    def hidden(self, x, flag):
        h = super().hidden(x, flag)
        return h + 0.1 * flag if torch.compiler.is_compiling() else h


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


class ShardedGradBug(Regressor):
    """When sharded, ``lin1.weight``'s gradient is scaled by 1.5 (the loss is unchanged)."""

    def hidden(self, x, flag):
        weight = self.lin1.weight
        if is_sharded(self):
            weight = _ScaleGrad.apply(weight)
        return torch.tanh(F.linear(x, weight, self.lin1.bias))


def regressor() -> nn.Module:
    return Regressor()


def compiled_only_bug() -> nn.Module:
    return CompiledOnlyBug()


def sharded_grad_bug() -> nn.Module:
    return ShardedGradBug()


def regression_batch(step: int, rank: int) -> tuple:
    g = torch.Generator().manual_seed(100 * step + rank)
    flag = torch.tensor(1.0 if step >= 2 else 0.0)
    return torch.randn(4, 6, generator=g), torch.randn(4, generator=g), flag


# ---- check_parity -----------------------------------------------------------------------------------
def test_gpt_matches_ddp_in_every_strategy_and_mode(capsys):
    report = check_parity(tiny_gpt, tiny_gpt_batch, steps=2, policy={Block}, inner="aot_eager")
    assert isinstance(report, ParityReport) and report.ok
    assert [(r.step, r.strategy, r.mode, r.reference) for r in report.rows] == [
        (step, strategy, mode, "ddp")
        for step in range(2)
        for strategy in STRATEGIES
        for mode in ("eager", "compiled")
    ]
    for row in report.rows:
        assert not row.diverged and row.what == ""
        assert row.loss > 0 and row.grad_norm > 0 and row.ref_grad_norm > 0
        assert row.loss_diff <= 1e-5 + 1e-4 * row.ref_loss
        assert row.max_grad_diff < 1e-4 and row.max_param_diff < 1e-4
    table = str(report)
    assert "reference: DDP" in table and table.count("  ok") == len(report.rows)
    assert table in capsys.readouterr().out


def test_mixed_precision_compares_compiled_with_eager():
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    report = check_parity(
        regressor, regression_batch, steps=2, strategies=("FULL_SHARD",), mixed_precision=mp,
        inner="aot_eager",
    )
    assert [(r.step, r.strategy, r.mode, r.reference) for r in report.rows] == [
        (0, "FULL_SHARD", "compiled", "eager"),
        (1, "FULL_SHARD", "compiled", "eager"),
    ]
    assert "eager fully_shard (same mixed precision)" in str(report)
    assert "DDP has no mixed precision" in str(report)


def test_catches_a_compiled_only_bug_at_its_first_step():
    with pytest.raises(AssertionError, match=r"first divergence at step 2: FULL_SHARD compiled vs ddp: .*loss") as info:
        check_parity(
            compiled_only_bug, regression_batch, steps=3, strategies=("FULL_SHARD", "NO_SHARD"),
            inner="aot_eager",
        )
    report = info.value.report
    bad = [(r.step, r.strategy, r.mode) for r in report.rows if r.diverged]
    assert bad == [(2, "FULL_SHARD", "compiled"), (2, "NO_SHARD", "compiled")]
    assert "step 2 NO_SHARD compiled" in str(info.value)


def test_catches_a_gradient_bug_naming_the_parameter():
    with pytest.raises(AssertionError, match=r"first divergence at step 0: SHARD_GRAD_OP eager vs ddp: rank \d: grad of 'lin1.weight'") as info:
        check_parity(
            sharded_grad_bug, regression_batch, steps=2, strategies=("SHARD_GRAD_OP",), inner="aot_eager",
        )
    rows = info.value.report.rows
    assert [(r.step, r.mode, r.diverged) for r in rows] == [(0, "eager", True), (0, "compiled", True), (1, "eager", True), (1, "compiled", True)]
    assert "loss" not in rows[0].what  # step 0: same loss, different gradient
    assert rows[0].loss_diff <= 1e-6 and rows[0].max_grad_diff > 1e-3


def _local_model_fn():
    def build():
        return Regressor()

    return build


@pytest.mark.parametrize(
    "model_fn, why",
    [
        (lambda: Regressor(), "is a lambda"),
        (_local_model_fn(), "is defined inside another function"),
        ("not callable", "must be callable"),
    ],
)
def test_refuses_functions_the_ranks_cannot_import(model_fn, why):
    with pytest.raises(TypeError, match=rf"model_fn=.* {why}|model_fn must be callable"):
        check_parity(model_fn, regression_batch)


def test_accepts_a_partial_of_a_module_level_function():
    from fsdp_compile.testing.parity import _check_importable

    _check_importable("batch_fn", functools.partial(regression_batch))


def test_noise_level_gradients_do_not_fail_the_parameter_check():
    """AdamW turns a rounding-noise gradient (reference exactly 0) into an lr-sized update: that
    element is left out of the parameter check, while an update bug with exact gradients is not."""
    from fsdp_compile.testing.parity import _compare

    ref_grads = {"w": torch.tensor([0.0, 0.5]), "b": torch.tensor([0.25])}
    ref_params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    want = (0, 1.0, ref_params, ref_grads)
    noisy_run = (0, 1.0, {"w": torch.tensor([1.0 + 1e-3, 2.0]), "b": torch.tensor([3.0])},
                 {"w": torch.tensor([1e-9, 0.5]), "b": torch.tensor([0.25])})
    noisy: dict = {}
    row = _compare(noisy_run, want, "FULL_SHARD", "compiled", "ddp", 1e-4, 1e-5, noisy)
    assert not row.diverged and row.noisy == 1 and row.max_param_diff == 0.0
    lost_update = (0, 1.0, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0 + 1e-3])}, ref_grads)
    row = _compare(lost_update, want, "FULL_SHARD", "compiled", "ddp", 1e-4, 1e-5, {})
    assert row.diverged and row.what.startswith("param 'b'") and row.noisy == 0
    grad_bug = (0, 1.0, ref_params, {"w": torch.tensor([0.0, 0.75]), "b": torch.tensor([0.25])})
    row = _compare(grad_bug, want, "FULL_SHARD", "compiled", "ddp", 1e-4, 1e-5, {})
    assert row.diverged and row.what.startswith("grad of 'w'")


# ---- command line ---------------------------------------------------------------------------------------
# The runs call the command line's ``main`` in this process (its ranks fork from the suite's
# server); one real ``python -m`` run checks the entry point's exit code without spawning ranks.
CLI_OPTIONS = ["--steps", "1", "--strategies", "FULL_SHARD", "--inner", "aot_eager"]


def test_cli_exit_codes(capsys, monkeypatch):
    from fsdp_compile.testing.__main__ import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory first
    assert main(["test_parity_harness:regressor", "test_parity_harness:regression_batch", *CLI_OPTIONS]) == 0
    good = capsys.readouterr()
    assert "FULL_SHARD" in good.out and "compiled" in good.out and "DIVERGED" not in good.out, good.out + good.err
    assert main(["test_parity_harness:sharded_grad_bug", "test_parity_harness:regression_batch", *CLI_OPTIONS]) == 1
    bad = capsys.readouterr()
    assert "first divergence at step 0: FULL_SHARD eager vs ddp" in bad.err, bad.out + bad.err
    assert "grad of 'lin1.weight'" in bad.err, bad.err


def test_cli_entry_point_exits_2_on_a_usage_error():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "fsdp_compile.testing", "no_such_module:build", "no_such_module:batch", *CLI_OPTIONS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot import 'no_such_module'" in done.stderr, done.stderr
