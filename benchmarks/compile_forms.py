"""Whole-model against per-block compilation: first-step time and steady step over depth.

    python benchmarks/compile_forms.py [--layers 4 16 32] [--dim 256] [--steps 8]
                                       [--systems NAME ...] [--json bench_results/compile_forms.json]

Each point is one ``benchmarks/step.py`` configuration run (``measure.run_system``: fresh
processes, 2 gloo ranks, one intra-op thread per rank) on a GPT of ``L`` blocks x d ``dim``
(``systems.model_config("L<layers>xD<dim>")``). The systems compare the two ways people compile:
the whole model as one graph (``torch.compile(model)``) and torchtitan's per-block form (every
Block compiled on its own with ``fullgraph=True``, the embedding and head eager), each for DDP,
torch's FSDP2 and fsdp_compile, all with Inductor. "first step" is the wall time of step 1
(Dynamo + AOTAutograd + Inductor, and the step itself); "graphs" is Dynamo's count of compiled
graphs on rank 0 (per-block forms that share one graph across identical blocks show 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402  -- runs one system, as step.py does
import report  # noqa: E402

SYSTEMS = ("ddp_compile", "ddp_per_block", "fsdp2_compile", "fsdp2_per_block", "fsdp_compile",
           "fsdp_compile_per_block")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    ap.add_argument("--json", default="bench_results/compile_forms.json")
    args = ap.parse_args(argv)
    points = []
    for layers in args.layers:
        for name in args.systems:
            model = f"L{layers}xD{args.dim}"
            print(f"== {name} {model}", flush=True)
            res = measure.run_system(name, 2, args.steps, model, timeout=args.timeout)
            points.append({"system": name, "layers": layers, "status": res["status"],
                           "first_step_s": res.get("first_step_s"), "median_step_ms": res.get("median_step_ms"),
                           "graphs": (res.get("dynamo") or {}).get("unique_graphs"),
                           "final_loss": res.get("final_loss"), "reason": res.get("reason")})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dim": args.dim, "steps": args.steps, "points": points}, indent=2))
    print()
    print(table(points))
    print(f"\nwrote {out}")
    return 0


def table(points: list[dict]) -> str:
    """One row per (system, depth): first step, steady step, graphs, and the steady step over
    DDP's in the same compile form."""
    by = {(p["system"], p["layers"]): p for p in points}
    head = ["system", "layers", "first step s", "steady step ms", "graphs", "step / DDP same form"]
    rows = []
    for p in points:
        form_ddp = "ddp_per_block" if p["system"].endswith("_per_block") else "ddp_compile"
        ddp = by.get((form_ddp, p["layers"]), {})
        ok = p["status"] == "ok"
        ratio = "-"
        if ok and ddp.get("status") == "ok":
            ratio = f"{p['median_step_ms'] / ddp['median_step_ms']:.2f}"
        rows.append([p["system"], p["layers"], f"{p['first_step_s']:.1f}" if ok else p["status"],
                     f"{p['median_step_ms']:.1f}" if ok else (p["reason"] or "")[:60],
                     p["graphs"] if p["graphs"] is not None else "-", ratio])
    return report.fmt_table(head, rows)


if __name__ == "__main__":
    sys.exit(main())
