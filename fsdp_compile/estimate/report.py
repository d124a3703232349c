"""An ``Estimate`` as a text table and as a PNG of memory over the step (matplotlib, optional)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .simulate import Estimate


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def table(est: "Estimate") -> str:
    replicas, per_replica = est.mesh
    mesh = f"HSDP {replicas}x{per_replica}" if replicas > 1 else f"1-D {per_replica}"
    if est.tp > 1:
        mesh += f" x TP {est.tp}"
    lines = [
        f"{est.model}: world {est.world_size} ({mesh}), {est.strategy}, shards {est.dtype['shards']}, "
        f"gather {est.dtype['gather']}, reduce {est.dtype['reduce']}, activation checkpointing "
        f"{'on' if est.activation_checkpointing else 'off'}, batch {est.batch} x seq {est.seq}",
        f"{len(est.param_shapes)} parameters "
        f"({sum(_numel(s) for s in est.param_shapes.values()) / 1e9:.2f} B elements) in {est.units} units",
        f"{'per rank':<22}{'rank 0':>14}{'max':>14}",
    ]
    fields = ("param_bytes", "grad_bytes", "optimizer_bytes", "buffer_bytes", "step_peak_bytes", "peak_bytes",
              "bytes_sent_per_step")
    r0, worst = est.ranks["0"], est.ranks["max"]
    for name in fields:
        lines.append(f"{name:<22}{fmt_bytes(getattr(r0, name)):>14}{fmt_bytes(getattr(worst, name)):>14}")
    lines.append(f"{'collectives_per_step':<22}{r0.collectives_per_step:>14}{worst.collectives_per_step:>14}")
    peak = r0.peak or {}
    lines.append(f"peak: {peak.get('phase')} node {peak.get('index')} ({peak.get('node')}, {peak.get('op')})")
    for group, entry in est.collectives.items():
        kinds = ", ".join(f"{k} x{v['count']} ({fmt_bytes(v['bytes'])})" for k, v in entry["by_kind"].items())
        lines.append(
            f"{group} group ({entry['group_size']} ranks): {entry['count']} collectives, "
            f"{fmt_bytes(entry['bytes'])} handed in, {fmt_bytes(entry['sent'])} sent: {kinds}"
        )
    lines.append(f"schedule fingerprint: {', '.join(f'rank {r} {f}' for r, f in est.fingerprints.items())}")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plot(est: "Estimate", path: str) -> None:
    """Rank 0's bytes over the step's nodes (forward, backward), steady state stacked below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("fsdp_compile.estimate: --plot needs matplotlib (pip install matplotlib)") from e
    r0 = est.ranks["0"]
    steady = r0.param_bytes + r0.buffer_bytes + r0.optimizer_bytes
    top = steady + max((p.bytes for p in est.timeline), default=0)
    unit, gib = next(((u, 2**e) for u, e in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if top >= 2**e), ("B", 1))
    xs = list(range(len(est.timeline)))
    ys = [(steady + p.bytes) / gib for p in est.timeline]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.fill_between(xs, 0, [steady / gib] * len(xs), color="#bbbbbb", label="params + buffers + optimizer state")
    ax.plot(xs, ys, color="#1f77b4", label="total (gathered units, activations, reduce buffers, grads)")
    bw = next((i for i, p in enumerate(est.timeline) if p.phase == "backward"), None)
    if bw is not None:
        ax.axvline(bw, color="k", linestyle=":", linewidth=1)
        ax.text(bw, max(ys) * 1.01, " backward", va="bottom")
    peak_at = max(xs, key=lambda i: ys[i]) if xs else 0
    if xs:
        ax.annotate(f"peak {fmt_bytes(r0.peak_bytes)}", (peak_at, ys[peak_at]), textcoords="offset points",
                    xytext=(10, -15))
    ax.set_xlabel("node of the compiled forward, then backward graph")
    ax.set_ylabel(f"{unit} on rank 0")
    replicas, per_replica = est.mesh
    mesh = f"HSDP {replicas}x{per_replica}" if replicas > 1 else f"world {per_replica}"
    ax.set_title(f"{est.model}, {mesh}, {est.strategy}, batch {est.batch} x {est.seq}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, max(ys) * 1.1 if ys else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
