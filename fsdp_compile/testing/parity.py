"""``check_parity``: train a user's model with DDP, eager ``fully_shard`` and compiled
``fully_shard`` on spawned gloo ranks, and compare them step by step.

Owns the harness (rank-side training loops, the comparison, the report); never touches the
library's internals: it uses the public API (``fully_shard``, ``summon_full_params``,
``fsdp_compile.backend``) exactly as a user would.

Per step and per (strategy, mode) it compares, against the reference:
- the loss of every rank (``torch.isclose(rtol, atol)``);
- every full gradient and every full parameter after the optimizer step (gathered with
  ``summon_full_params(with_grads=True, writeback=False)``).
The reference is DDP (full precision). With ``mixed_precision``, DDP is no reference (it does
not cast); the compiled run of each strategy is compared with its eager run instead.
"""
from __future__ import annotations

import math
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from fsdp_compile.consistency import first_mismatch_across_ranks

from .spawn import run_ranks

LR = 1e-3  # AdamW learning rate of every run
# AdamW turns any gradient element into an update of about +-LR, however small: where the true
# gradient is (near) zero, rounding noise (compiled kernels reduce in another order) becomes an
# lr-sized parameter difference that says nothing about sharding. So a parameter element whose
# gradient ever differed from the reference's by more than this fraction of it is left out of
# the parameter comparison from then on (its gradients are still compared with rtol/atol).
NOISY_GRAD = 1e-3
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class ParityRow:
    """One (step, strategy, mode) compared with its reference. Losses are averaged over ranks;
    differences are the largest over ranks; norms are global (full gradients)."""

    step: int
    strategy: str
    mode: str
    reference: str  # "ddp" or "eager" (with mixed precision)
    loss: float
    ref_loss: float
    loss_diff: float
    grad_norm: float
    ref_grad_norm: float
    grad_norm_diff: float
    max_grad_diff: float  # largest |grad - ref grad| over every element of every parameter
    max_param_diff: float  # same for the parameters after the optimizer step (noisy elements excluded)
    noisy: int  # parameter elements not compared (noise-level gradients so far, see NOISY_GRAD)
    diverged: bool
    what: str = ""  # the first mismatch of this row: "loss", "grad of 'x'", "param 'x'", ...


@dataclass
class ParityReport:
    """What ``check_parity`` compared; ``str(report)`` is the per-step table."""

    rows: list[ParityRow]
    world_size: int
    steps: int
    strategies: tuple[str, ...]
    inner: str
    rtol: float
    atol: float
    mixed_precision: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def divergences(self) -> list[ParityRow]:
        return [r for r in self.rows if r.diverged]

    @property
    def ok(self) -> bool:
        return not self.divergences

    def first_divergence(self) -> Optional[ParityRow]:
        bad = self.divergences
        return min(bad, key=lambda r: r.step) if bad else None

    def __str__(self) -> str:
        reference = "DDP" if self.mixed_precision is None else "eager fully_shard (same mixed precision)"
        lines = [
            f"check_parity: world_size={self.world_size} steps={self.steps} inner={self.inner} "
            f"rtol={self.rtol:g} atol={self.atol:g}; reference: {reference}",
            *self.notes,
        ]
        if any(r.noisy for r in self.rows):
            lines.append(
                f"noisy: parameter elements left out of the parameter comparison because their "
                f"gradient differed by more than {NOISY_GRAD:g} of itself (noise-level gradients, "
                "which AdamW turns into lr-sized updates); their gradients are still compared"
            )
        header = (
            f"{'step':>4}  {'strategy':<13} {'mode':<8} {'ref':<5} {'loss':>11} {'|dloss|':>9} "
            f"{'grad_norm':>10} {'|dnorm|':>9} {'max|dgrad|':>10} {'max|dparam|':>11} {'noisy':>5}  status"
        )
        lines += [header, "-" * len(header)]
        for r in self.rows:
            status = f"DIVERGED: {r.what}" if r.diverged else "ok"
            lines.append(
                f"{r.step:>4}  {r.strategy:<13} {r.mode:<8} {r.reference:<5} {r.loss:>11.6g} "
                f"{r.loss_diff:>9.2e} {r.grad_norm:>10.5g} {r.grad_norm_diff:>9.2e} "
                f"{r.max_grad_diff:>10.2e} {r.max_param_diff:>11.2e} {r.noisy:>5}  {status}"
            )
        return "\n".join(lines)


def check_parity(
    model_fn: Callable[[], nn.Module],
    batch_fn: Callable[[int, int], tuple],
    *,
    world_size: int = 2,
    steps: int = 5,
    strategies: Sequence[str] = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"),
    mixed_precision=None,
    policy=None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    inner: str = "inductor",
    timeout: float = 600.0,
) -> ParityReport:
    """Train ``model_fn()`` for ``steps`` AdamW steps on ``world_size`` spawned gloo ranks with
    DDP, eager ``fully_shard`` and ``torch.compile``-d ``fully_shard`` (backend
    ``fsdp_compile.backend(inner=inner)``) for each of ``strategies``; print and return the
    per-step report, or raise ``AssertionError`` naming the first diverging step, strategy,
    mode and parameter (the report is attached as ``error.report``).

    ``model_fn()`` builds the model; the harness seeds ``torch.manual_seed(0)`` before each call,
    and every rank must build the same parameters. ``model(*batch_fn(step, rank))`` must return
    a scalar loss; ``batch_fn(step, rank)`` returns that rank's inputs as a tuple (different
    data per rank, as in data-parallel training). Both run in spawned processes, which import
    them by name: they must be module-level functions (or ``functools.partial`` of them) in an
    importable module, not lambdas or nested functions. ``policy`` and ``mixed_precision`` are
    passed to ``fully_shard``; with ``mixed_precision`` compiled is compared with eager (DDP
    has no mixed precision). ``rtol``/``atol`` apply to losses, gradients and parameters.
    """
    from ..config import MixedPrecision, ShardingStrategy

    for name, fn in (("model_fn", model_fn), ("batch_fn", batch_fn)):
        _check_importable(name, fn)
    if policy is not None:
        for item in policy if isinstance(policy, (set, frozenset, list, tuple)) else [policy]:
            _check_importable("policy", item)
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
        raise TypeError(f"check_parity: mixed_precision must be a fsdp_compile.MixedPrecision, got {mixed_precision!r}")
    if inner not in ("inductor", "aot_eager"):
        raise ValueError(f"check_parity: inner={inner!r}; use 'inductor' or 'aot_eager'")
    if isinstance(strategies, str):
        strategies = (strategies,)
    strategies = tuple(ShardingStrategy.parse(s).name for s in strategies)
    if not strategies or steps < 1 or world_size < 1:
        raise ValueError(
            f"check_parity: need at least one strategy, step and rank (strategies={strategies}, "
            f"steps={steps}, world_size={world_size})"
        )
    config = dict(
        steps=steps, strategies=strategies, mixed_precision=mixed_precision, policy=policy,
        rtol=rtol, atol=atol, inner=inner,
    )
    per_rank = run_ranks(_rank_main, world_size, model_fn, batch_fn, config, timeout=timeout)
    report = ParityReport(
        rows=_merge(per_rank), world_size=world_size, steps=steps, strategies=strategies,
        inner=inner, rtol=rtol, atol=atol, mixed_precision=mixed_precision,
    )
    if mixed_precision is not None:
        report.notes.append(
            f"mixed precision {mixed_precision}: DDP has no mixed precision, so each strategy's "
            "compiled run is compared with its eager run (the eager rows are not checked)"
        )
    print(report)
    first = report.first_divergence()
    if first is not None:
        firsts: dict = {}
        for r in report.divergences:
            firsts.setdefault((r.strategy, r.mode), r)
        others = [f"  step {r.step} {r.strategy} {r.mode}: {r.what}" for r in firsts.values() if r is not first]
        error = AssertionError(
            f"check_parity: first divergence at step {first.step}: {first.strategy} {first.mode} "
            f"vs {first.reference}: {first.what} (rtol={rtol:g}, atol={atol:g})"
            + ("\nfirst divergence of the other runs:\n" + "\n".join(others) if others else "")
            + f"\n\n{report}"
        )
        error.report = report
        raise error
    return report


def _check_importable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"check_parity: {name} must be callable, got {fn!r}")
    target = getattr(fn, "func", fn)  # functools.partial
    qualname = getattr(target, "__qualname__", "")
    module = getattr(target, "__module__", None)
    why = None
    if "<lambda>" in qualname:
        why = "is a lambda"
    elif "<locals>" in qualname:
        why = "is defined inside another function"
    elif module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None):
        why = "is defined in an interactive session or `python -c`"
    else:
        try:
            pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 -- any pickling failure means the same thing
            why = f"cannot be pickled ({type(exc).__name__}: {exc})"
    if why:
        raise TypeError(
            f"check_parity: {name}={fn!r} {why}; the spawned ranks import it by name, so define "
            f"it at module level in an importable file (e.g. `def {name}(...)` in my_models.py)"
        )


# ---- inside each rank ---------------------------------------------------------------------------
def _rank_main(rank: int, world: int, model_fn, batch_fn, config: dict) -> list[ParityRow]:
    import fsdp_compile

    rtol, atol, mp, steps = config["rtol"], config["atol"], config["mixed_precision"], config["steps"]

    def build(strategy: Optional[str], mode: str):
        torch.manual_seed(0)
        model = model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"check_parity: model_fn() returned {type(model).__name__}, not an nn.Module")
        if strategy is None:
            _check_same_params(model)
            return model, nn.parallel.DistributedDataParallel(model)
        fsdp_compile.fully_shard(model, policy=config["policy"], strategy=strategy, mixed_precision=mp)
        if mode == "eager":
            return model, model
        torch.compiler.reset()
        return model, torch.compile(model, backend=fsdp_compile.backend(inner=config["inner"]))

    def trajectory(strategy: Optional[str], mode: str):
        model, run = build(strategy, mode)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        for step in range(steps):
            batch = batch_fn(step, rank)
            if not isinstance(batch, tuple):
                raise TypeError(f"check_parity: batch_fn({step}, {rank}) returned {type(batch).__name__}, not a tuple")
            loss = run(*batch)
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise TypeError(
                    f"check_parity: the model returned {type(loss).__name__} "
                    f"{tuple(getattr(loss, 'shape', ()))}; forward(*batch) must return a scalar loss"
                )
            loss.backward()
            opt.step()
            yield step, loss.item(), *_full_state(model, fsdp=strategy is not None)
            opt.zero_grad(set_to_none=True)

    rows: list[ParityRow] = []
    reference = None if mp is not None else list(trajectory(None, "ddp"))
    for strategy in config["strategies"]:
        if mp is not None:
            reference = list(trajectory(strategy, "eager"))
        for mode in MODES:
            if mp is not None and mode == "eager":
                continue
            ref_name = "ddp" if mp is None else "eager"
            noisy: dict[str, torch.Tensor] = {}
            for got, want in zip(trajectory(strategy, mode), reference):
                rows.append(_compare(got, want, strategy, mode, ref_name, rtol, atol, noisy))
    return rows


def _check_same_params(model: nn.Module) -> None:
    mine = [(n, tuple(p.shape), float(p.detach().double().sum())) for n, p in model.named_parameters()]
    mismatch = first_mismatch_across_ranks(mine)
    if mismatch is not None:
        rank = mismatch[0]
        raise RuntimeError(
            f"check_parity: model_fn() builds different parameters on rank {rank} and rank "
            f"{dist.get_rank()}; build the model deterministically (it runs after "
            "torch.manual_seed(0) on every rank)"
        )


def _full_state(model: nn.Module, fsdp: bool):
    """Full parameters and gradients (name -> tensor or None), as copies."""
    from ..full_params import summon_full_params

    def take(named):
        named = list(named)
        params = {n: p.detach().clone() for n, p in named}
        return params, {n: None if p.grad is None else p.grad.detach().clone() for n, p in named}

    if not fsdp:
        return take(model.named_parameters())
    with summon_full_params(model, writeback=False, with_grads=True):
        return take(model.named_parameters())


def _compare(got, want, strategy, mode, ref_name, rtol, atol, noisy: dict) -> ParityRow:
    """Compare one step; ``noisy`` (name -> bool mask, updated here) marks the parameter
    elements exempt from the parameter check: see ``NOISY_GRAD``."""
    step, loss, params, grads = got
    _, ref_loss, ref_params, ref_grads = want
    what = []
    if not (abs(loss - ref_loss) <= atol + rtol * abs(ref_loss) or (math.isnan(loss) and math.isnan(ref_loss))):
        what.append(f"loss {loss:.8g} vs {ref_loss:.8g}")
    if list(params) != list(ref_params):
        what.append(f"parameter names differ: {list(params)} vs {list(ref_params)}")
    max_grad = max_param = 0.0
    for kind, mine, theirs in (("grad of", grads, ref_grads), ("param", params, ref_params)):
        for name, ref in theirs.items():
            value = mine.get(name)
            if (value is None) != (ref is None):
                what.append(f"{kind} {name!r} is {'None' if value is None else 'set'}, reference's is {'None' if ref is None else 'set'}")
                continue
            if ref is None:
                continue
            if value.shape != ref.shape:
                what.append(f"{kind} {name!r} has shape {tuple(value.shape)}, reference's {tuple(ref.shape)}")
                continue
            value, ref = value.double(), ref.double()
            error = (value - ref).abs()
            close = torch.isclose(value, ref, rtol=rtol, atol=atol, equal_nan=True)
            if kind == "grad of":
                noisy[name] = noisy.get(name, torch.zeros_like(close)) | (error > NOISY_GRAD * ref.abs())
            elif name in noisy:
                error, close = error.masked_fill(noisy[name], 0), close | noisy[name]
            diff = error.max().item() if ref.numel() else 0.0
            if kind == "grad of":
                max_grad = max(max_grad, diff)
            else:
                max_param = max(max_param, diff)
            if not close.all():
                what.append(f"{kind} {name!r} (max abs diff {diff:.3e})")
    norm, ref_norm = _norm(grads), _norm(ref_grads)
    return ParityRow(
        step=step, strategy=strategy, mode=mode, reference=ref_name,
        loss=loss, ref_loss=ref_loss, loss_diff=abs(loss - ref_loss),
        grad_norm=norm, ref_grad_norm=ref_norm, grad_norm_diff=abs(norm - ref_norm),
        max_grad_diff=max_grad, max_param_diff=max_param,
        noisy=int(sum(int(m.sum()) for m in noisy.values())),
        diverged=bool(what), what="; ".join(what[:3]) + (f"; ... ({len(what)} mismatches)" if len(what) > 3 else ""),
    )


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values() if g is not None))


def _merge(per_rank: list[list[ParityRow]]) -> list[ParityRow]:
    """One row per (step, strategy, mode): mean loss over ranks, largest differences, and the
    first mismatch of the lowest diverging rank."""
    merged = []
    for rows in zip(*per_rank):
        first = rows[0]
        bad = [r for r in rows if r.diverged]
        merged.append(
            ParityRow(
                step=first.step, strategy=first.strategy, mode=first.mode, reference=first.reference,
                loss=sum(r.loss for r in rows) / len(rows),
                ref_loss=sum(r.ref_loss for r in rows) / len(rows),
                loss_diff=max(r.loss_diff for r in rows),
                grad_norm=first.grad_norm, ref_grad_norm=first.ref_grad_norm,
                grad_norm_diff=max(r.grad_norm_diff for r in rows),
                max_grad_diff=max(r.max_grad_diff for r in rows),
                max_param_diff=max(r.max_param_diff for r in rows),
                noisy=max(r.noisy for r in rows),
                diverged=bool(bad),
                what=(f"rank {rows.index(bad[0])}: {bad[0].what}" if bad else ""),
            )
        )
    return sorted(merged, key=lambda r: r.step)  # stable: strategies and modes keep their order
