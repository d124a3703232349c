"""Where each rank's CPU goes in a training step, per thread and per kind of work (Linux ``perf``).

    python benchmarks/cpu_by_thread.py [--model 8x512] [--configs ddp_compile fsdp_compile] [--steps 8]

For each configuration of ``step.py`` (same model, data, optimizer and build), 2 gloo ranks train
4 warm-up steps (compile included), then ``perf record`` samples both rank processes (every
thread: the main thread, gloo's worker ``pt_gloo_runloop`` and its transport ``gloo_tcp_loop``)
at 999 Hz over exactly ``--steps`` steps. Each sample is charged to its thread and to a kind of
work by the innermost function it hit (``KINDS``). The table gives ms of CPU per rank per step.

The profiler's view (``step.py``'s breakdown) times ops on the main thread; this one sees every
thread, user and kernel, which is what bounds a CPU rank whose threads share one core. Needs the
``perf`` tool (``linux-tools``) and permission to profile the ranks (root, or
``kernel.perf_event_paranoid`` <= 1). What it found is in benchmarks/README.md ("Where the CPU
goes").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402  (one training step)
import systems  # noqa: E402  (the systems and the models)

from fsdp_compile.testing.spawn import run_ranks  # noqa: E402

HZ = 999
# kind of work -> innermost-function pattern; the first match wins, "other" takes the rest
KINDS = (
    ("matmul", r"gemm|mkl_blas|dnnl|flash_attention"),
    ("copies", r"direct_copy_kernel|cat_serial_kernel|memmove|memcpy|split_with_sizes|chunk_cat"),
    ("elementwise", r"lerp|addcdiv|addcmul|sqrt|div_true|mul_kernel|add_kernel|fill_kernel|sum<"),
    ("page faults", r"exc_page_fault|clear_page|do_anonymous_page|handle_mm_fault|memcg"),
    ("socket copies", r"_copy_to_iter|_copy_from_iter|skb_|tcp_"),
    ("python gc", r"gc_collect|visit_decref|visit_reachable|subtract_refs|update_refs|move_unreachable"),
)
# the main thread, gloo's worker, gloo's socket transport, and the rest
THREADS = ("main", "pt_gloo_runloop", "gloo_tcp_loop", "other threads")


def thread_of(comm: str) -> str:
    """The main thread carries the interpreter's name (python, python3.11, ...)."""
    return "main" if comm.startswith("python") else comm if comm in THREADS else "other threads"


def kind_of(symbol: str) -> str:
    """The first ``KINDS`` entry whose pattern the function name matches, else "other"."""
    for kind, pattern in KINDS:
        if re.search(pattern, symbol):
            return kind
    return "other"


def tally(perf_script: str, steps: int, ranks: int) -> dict[tuple[str, str], float]:
    """``perf script -F comm,ip,sym`` output (one sample per line: thread name, address, function)
    -> ms per rank per step for each (thread, kind), threads named by ``thread_of``."""
    samples: Counter = Counter()
    for line in perf_script.splitlines():
        fields = line.split(None, 2)
        if len(fields) >= 2:
            samples[thread_of(fields[0]), kind_of(fields[2] if len(fields) == 3 else "[unknown]")] += 1
    per_rank_step = 1e3 / HZ / (steps * ranks)
    return {key: n * per_rank_step for key, n in samples.items()}


def _worker(rank: int, world: int, name: str, model: str, steps: int, data: str) -> dict:
    import torch
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    from fsdp_compile.testing.gpt import gpt_batch

    torch.set_num_threads(1)
    inductor_config.compile_threads = 1
    cfg = systems.model_config(model)
    net, scale = systems.build(name, rank, world, cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=systems.LR)

    def one(i):
        measure.train_step(net, opt, gpt_batch(i, rank, cfg), scale)
        opt.zero_grad(set_to_none=True)

    for i in range(4):
        one(i)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    perf = None
    if rank == 0:
        perf = subprocess.Popen(["perf", "record", "-F", str(HZ), "-o", data, "-p", ",".join(map(str, pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)  # perf attaches to every thread of both processes
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        one(4 + i)
    dist.barrier()
    wall, cpu = (time.perf_counter() - t0) / steps * 1e3, (time.process_time() - c0) / steps * 1e3
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=60)
        if not os.path.exists(data):
            raise RuntimeError(f"perf record wrote no samples (root, or kernel.perf_event_paranoid <= 1?): {err.strip()[-500:]}")
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="8x512")
    ap.add_argument("--configs", nargs="+", default=["ddp_compile", "fsdp_compile"])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("cpu_by_thread.py needs Linux perf on PATH (package linux-tools)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="cpu_by_thread_") as tmp:
        for name in args.configs:
            data = os.path.join(tmp, f"{name}.data")
            ranks = run_ranks(_worker, 2, name, args.model, args.steps, data, timeout=1800)
            script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym"],
                                    capture_output=True, text=True, check=True).stdout
            results[name] = (tally(script, args.steps, 2), ranks[0])
    kinds = [kind for kind, _ in KINDS] + ["other"]
    print(f"ms of CPU per rank per step, {args.model}, {args.steps} steps sampled at {HZ} Hz")
    print("| thread | kind | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    for thread in THREADS:
        for kind in [k for k in kinds if any((thread, k) in table for table, _ in results.values())]:
            print(f"| {thread} | {kind} | " + " | ".join(f"{table.get((thread, kind), 0.0):.1f}" for table, _ in results.values()) + " |")
        print(f"| {thread} | **all** | " + " | ".join(
            f"{sum(v for (t, _), v in table.items() if t == thread):.1f}" for table, _ in results.values()) + " |")
    print("| all threads | **all** | " + " | ".join(f"{sum(table.values()):.1f}" for table, _ in results.values()) + " |")
    print("| (rank 0, timed) | wall / process CPU ms per step | " + " | ".join(
        f"{r['wall']:.0f} / {r['cpu']:.0f}" for _, r in results.values()) + " |")


if __name__ == "__main__":
    main()
