"""Training-step benchmark: a GPT on gloo ranks (CPU, 2 unless --world), one run, the systems of ``systems.py``.

    python benchmarks/step.py [--model readme|8x512] [--rounds R] [--steps 20] [--quick]
                              [--only NAME[,NAME]] [--json PATH] [--baseline PATH] [--world 2]

``--world N``: gloo ranks (default 2). The tensor-parallel systems (``fsdp2_tp2``,
``fsdp_compile_tp2``: dp world/2 x tp 2) join the default set only at a world with data
parallelism beside TP (``--world 4``); ``--only`` picks them at any multiple of 2.

Models (``--model``): ``readme`` is the README GPT (``GPTConfig()``: 8 blocks x d 64, tied head,
0.4 M parameters, where the 27 collectives per step dominate); ``8x512`` is ``GPT_8X512`` (8 blocks
x d 512, ffn 2048, vocab 8192, seq 128, untied head, 33.7 M parameters). Batch 4 for both.

Rounds (``--rounds R``): the systems run interleaved, A B C A B C ..., each round in new
processes, so a slow spell of a shared machine hits every system. Per system the table gives the
median step over every round's timed steps, and the ratio of its median step to DDP+compile's in
the same round: median over rounds, with the min-max spread.

Systems (``--only`` takes their names; ``--help`` lists them): ``systems.SYSTEMS``, one entry per
system. What is measured, and how: ``measure.py``'s docstring. The tables and the plot
(``<json stem>.png``: median step and total high-water per system, when matplotlib is installed,
``pip install -e '.[bench]'``): ``report.py``. ``--baseline PATH`` runs ``fsdp_compile_baseline``
from an earlier checkout interleaved with this one (``measure.prepare_baseline``).
"""
from __future__ import annotations

import argparse
import re
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import report  # noqa: E402
import systems  # noqa: E402

WORLD = 2


def _ratios_vs_ddp_compile(by_round: list[dict[str, dict]], results: list[dict]) -> None:
    """Per round, each system's median step over DDP+compile's; the median (min-max) over rounds
    goes into ``ratio_vs_ddp_compile``. Also each system's largest loss difference from ``ddp``."""
    ratios: dict[str, list[float]] = {}
    for rnd in by_round:
        base = rnd.get("ddp_compile")
        if base is None or base["status"] != "ok":
            continue
        for name, r in rnd.items():
            if r["status"] == "ok":
                ratios.setdefault(name, []).append(r["median_step_ms"] / base["median_step_ms"])
    ddp = next((r for r in results if r["name"] == "ddp" and r["status"] == "ok"), None)
    for r in results:
        if r["name"] in ratios:
            rs = ratios[r["name"]]
            r["ratio_vs_ddp_compile"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "each": rs}
        if r["status"] == "ok" and ddp is not None:
            r["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(r["losses"], ddp["losses"]))


def _model_name(text: str) -> str:
    """argparse type of ``--model``: a named model or an ``L<layers>xD<dim>`` GPT."""
    if text in systems.MODELS or re.fullmatch(r"L[1-9][0-9]*xD[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose {', '.join(systems.MODELS)} or L<layers>xD<dim>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems:\n" + systems.describe())
    ap.add_argument("--model", type=_model_name, default="readme",
                    help=f"{' | '.join(systems.MODELS)} | L<layers>xD<dim> (e.g. L16xD256)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (A B C A B C ...)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 steps (a smoke run)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(systems.SYSTEMS)}")
    ap.add_argument("--json", default="bench_results/step.json")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per system")
    ap.add_argument("--world", type=int, default=WORLD, help="gloo ranks (tensor-parallel systems: dp world/tp x tp)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of an earlier commit, run as the fsdp_compile_baseline system")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if steps < 3:
        ap.error("--steps must be >= 3 (a first step, a timed step, a profiled step)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [
        n for n, s in systems.SYSTEMS.items()
        if (not s.from_baseline or args.baseline is not None) and (s.tp == 1 or args.world >= 2 * s.tp)]
    bad = [n for n in names if n not in systems.SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {bad}; choose from {', '.join(systems.SYSTEMS)}")
    uneven = [n for n in names if args.world % systems.SYSTEMS[n].tp]
    if uneven:
        ap.error(f"--world {args.world} is not a multiple of the tensor-parallel size of {uneven}")

    import torch

    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        measure.prepare_baseline(args.baseline)
    print(f"torch {torch.__version__}, {args.world} gloo ranks, model {args.model}, {steps} steps, "
          f"{args.rounds} round(s), configs: {', '.join(names)}", flush=True)
    by_round: list[dict[str, dict]] = []
    for rnd in range(args.rounds):
        this_round = {}
        for name in names:
            print(f"== round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
            this_round[name] = measure.run_system(name, args.world, steps, args.model, args.timeout, args.baseline)
        by_round.append(this_round)
    results = [measure.merge_rounds(name, [rnd[name] for rnd in by_round]) for name in names]
    _ratios_vs_ddp_compile(by_round, results)
    print()
    print(report.text(results))

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "world": args.world, "steps": steps, "rounds": args.rounds, "model": args.model,
            "lr": systems.LR, "seed": systems.SEED, "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"\nwrote {out}")
    plot = report.plot(results, out.with_suffix(".png"), f"{args.model} GPT, {args.world} gloo ranks, {args.rounds} round(s)")
    if plot is not None:
        print(f"wrote {plot}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
