"""The step benchmark's report: the tables it prints and the plot it writes. Owns no measurement
(``measure.py``) and no system (``systems.py``); reads the summaries ``measure.run_system``
returns."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import systems


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def fmt_table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def table(results: list[dict]) -> str:
    head = ["config", "status", "first step s", "median ms", "vs ddp_compile (min-max)", "cpu ms",
            "peak step MiB (min-max)", "steady MiB", "total MiB", "p+g+opt MiB",
            "coll/step", "breaks/graphs/ops", "final loss", "|dloss| vs ddp"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["name"], r["status"], *["-"] * (len(head) - 2)])
            continue
        kinds = " + ".join(f"{v} {k}" for k, v in r["collectives_by_kind"].items() if k != "barrier")
        dyn = r["dynamo"]
        ratio = r.get("ratio_vs_ddp_compile")
        rows.append([
            r["name"], "ok", f"{r['first_step_s']:.2f}", f"{r['median_step_ms']:.1f}",
            "-" if ratio is None else f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})",
            f"{r['median_cpu_ms']:.1f}",
            f"{_mib(r['peak_step_mem_bytes'])} ({_mib(min(r['peak_step_mem_bytes_each']))}-"
            f"{_mib(max(r['peak_step_mem_bytes_each']))})",
            "-" if r["steady_bytes"] is None else _mib(r["steady_bytes"]),
            "-" if r["total_bytes"] is None else _mib(r["total_bytes"]),
            _mib(r["state_bytes"]["total"]),
            f"{r['collectives_per_step']} = {kinds}",
            (f"{dyn['graph_breaks_resumed']}+{dyn['graph_breaks_frame_skipped']}/{dyn['unique_graphs']}"
             f"/{dyn['calls_captured']}") if dyn else "-",
            f"{r['final_loss']:.5f}",
            "-" if r.get("max_loss_diff_vs_ddp") is None else f"{r['max_loss_diff_vs_ddp']:.1e}",
        ])
    return fmt_table(head, rows)


PHASES = ("forward", "backward", "optimizer", "compute", "collective", "copy")


def phase_table(results: list[dict]) -> str:
    rows = [[r["name"], *(f"{r['phases_ms'].get(k, float('nan')):.1f}" for k in PHASES),
             f"{r['median_sys_ms']:.1f}", f"{r['median_page_faults']:.0f}"]
            for r in results if r["status"] == "ok" and systems.SYSTEMS[r["name"]].breakdown]
    return fmt_table(["config (ms per step)", *PHASES, "sys (kernel) cpu", "page faults"], rows)


def text(results: list[dict]) -> str:
    """Everything the benchmark prints after its runs: the main table, the phase table of the
    systems marked ``breakdown``, the first graph-break reasons, and why a system did not run."""
    parts = [table(results)]
    if any(r["status"] == "ok" and systems.SYSTEMS[r["name"]].breakdown for r in results):
        parts.append(phase_table(results))
    for r in results:
        if r["status"] == "ok" and r["dynamo"] and r["dynamo"]["break_reasons"]:
            parts.append("\n".join([f"{r['name']} graph breaks (first reasons):",
                                    *("   " + reason.replace("\n", " ") for reason in r["dynamo"]["break_reasons"])]))
    for r in results:
        if r["status"] != "ok":
            parts.append(f"{r['name']}: {r['status']}: {r['reason']}")
    return "\n\n".join(parts)


def plot(results: list[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    ok = [r for r in results if r["status"] == "ok"]
    names = [r["name"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 2))
    ax1.barh(names, [r["median_step_ms"] for r in ok], color="tab:blue")
    ax1.set_xlabel("median step (ms)")
    ax1.invert_yaxis()
    steady = [(r["steady_bytes"] or 0) / 2**20 for r in ok]
    peak = [r["peak_step_mem_bytes"] / 2**20 for r in ok]
    ax2.barh(names, steady, color="tab:gray", label="steady (between steps)")
    ax2.barh(names, peak, left=steady, color="tab:orange", label="step peak growth")
    ax2.set_xlabel("total high-water per rank (MiB)")
    ax2.invert_yaxis()
    ax2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
