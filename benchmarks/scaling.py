"""How cost grows: per-rank steady memory and step time of fsdp_compile (compiled) and
FSDP2 (eager) over layers x world size, on gloo CPU ranks.

    python benchmarks/scaling.py [--layers 4 8 16] [--worlds 1 2 4] [--dim 256] [--steps 8]
                                 [--json bench_results/scaling.json]

Each point is one ``benchmarks/step.py`` configuration run (``measure.run_system``: fresh processes, one
intra-op thread per rank, profiler-measured step peak, ``mallinfo2`` steady bytes) on a GPT of
``L`` blocks x d ``dim`` (vocab 8192, seq 128, untied head, batch 4 per rank). Sharded state
should fall as 1/world plus a constant (the process itself: torch, Python, compiled code); the
table gives steady MiB, its change from world 1, the median step and the ratio ours/FSDP2.
World sizes above the core count oversubscribe the machine: compare systems within a column,
not step times across columns.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402  -- runs one system, as step.py does
import report  # noqa: E402

SYSTEMS = ("fsdp2", "fsdp_compile")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="bench_results/scaling.json")
    args = ap.parse_args(argv)
    points = []
    for layers in args.layers:
        for world in args.worlds:
            for name in SYSTEMS:
                model = f"L{layers}xD{args.dim}"
                print(f"== {name} {model} world {world}", flush=True)
                res = measure.run_system(name, world, args.steps, model, timeout=1800.0)
                points.append({"system": name, "layers": layers, "world": world, "status": res["status"],
                               "steady_bytes": res.get("steady_bytes"), "peak_step_bytes": res.get("peak_step_mem_bytes"),
                               "state_bytes": (res.get("state_bytes") or {}).get("total"),
                               "median_step_ms": res.get("median_step_ms"), "reason": res.get("reason")})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dim": args.dim, "points": points}, indent=2))
    print()
    print(_table(points))
    print(f"\nwrote {out}")
    return 0


def _table(points: list[dict]) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    by = {(p["system"], p["layers"], p["world"]): p for p in points}
    head = ["layers", "world", "FSDP2 steady MiB", "ours steady MiB", "ours p+g+opt MiB", "FSDP2 step ms",
            "ours step ms", "ours/FSDP2 step"]
    rows = []
    for (system, layers, world), p in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if system != "fsdp_compile":
            continue
        f2 = by.get(("fsdp2", layers, world), {})
        ok = p["status"] == "ok" and f2.get("status") == "ok"
        rows.append([layers, world, mib(f2.get("steady_bytes")), mib(p["steady_bytes"]), mib(p["state_bytes"]),
                     f"{f2.get('median_step_ms', float('nan')):.1f}" if f2 else "-",
                     f"{p['median_step_ms']:.1f}" if p["status"] == "ok" else p["status"],
                     f"{p['median_step_ms'] / f2['median_step_ms']:.2f}" if ok else "-"])
    return report.fmt_table(head, rows)


if __name__ == "__main__":
    sys.exit(main())
