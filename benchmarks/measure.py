"""Measuring one system's training step: the per-rank loop and what it records, and the parent
that runs a system on fresh ranks and summarizes them. Owns no system (``systems.py``) and prints
no table (``report.py``).

Every system runs in its own freshly spawned pair of processes with a new gloo process
group (``fsdp_compile.testing.spawn.run_ranks``), each rank with one intra-op thread, inductor
``compile_threads=1`` and an empty inductor cache directory of its own (so the first step is a cold
compile). A system that fails prints its error and the run goes on. ``run_ranks`` gives
each rank one intra-op thread: two ranks with two OpenMP threads each on 2 cores spin-wait against
each other (steps of 1-3 s instead of ~50-300 ms).

Of the N steps, step 0 is timed on its own (``first_step_s``: includes compilation), the last
``min(5, N-2)`` steps run under ``torch.profiler`` (so they are not timed), and the steps between
are timed (``median_step_ms``/``min_step_ms``: wall time, per step the slower rank, then
the median/min; ``median_cpu_ms``: the same with ``time.process_time()``, the CPU time of all the
rank's threads, gloo's included -- far less sensitive than wall time to other processes on a
shared machine). The profiled steps measure:

* ``peak_step_mem`` -- peak memory growth during one step, measured by the CPU allocator's own
  profiler hooks, not by any library's accounting: ``torch.profiler.profile(profile_memory=True)``
  records a ``[memory]`` event (+bytes / -bytes) for every CPU allocation and free made through
  c10's allocator (eager ops, inductor buffers, collective outputs, optimizer state) on any thread.
  Sorted by time, the running sum of those events is the memory allocated during the step and
  still live; its maximum is the peak growth. Blocks allocated before the step (parameters,
  optimizer state) are not counted, and neither are their frees (the profiler drops a free of a
  block it did not see allocated, with a one-time warning). Per profiled step the max over ranks,
  then the median over the profiled steps; the table also shows min-max. It varies from step to
  step in multiples of one Block's fp32 parameters (199,936 bytes): whether an asynchronous
  collective has completed and freed its buffer before the next unit's allocation is timing.
* ``collectives`` -- profiler events of a profiled step whose name is a process-group collective issued
  to gloo (``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:reduce_scatter``, ...). Each call the
  backend receives records exactly one ``gloo:*`` event, whatever issued it (DDP buckets, FSDP1/2,
  DTensor redistribute, functional collectives in compiled graphs), so their count is the
  collectives per step. gloo has no reduce-scatter of its own: ``reduce_scatter_tensor`` records
  ``gloo:all_reduce`` (pytorch#118911), so the kind is taken from the ``c10d::`` op that issued
  the call (``c10d::_reduce_scatter_base_`` -> rs); the JSON keeps the counts of every
  ``c10d::``/``_c10d_functional::``/``gloo:`` event name seen. Max over ranks and profiled
  steps; ``collectives_same_every_profiled_step`` says whether every rank and step agreed.
* ``state_bytes`` -- bytes of parameters + gradients + optimizer state held by a rank after the
  last optimizer step (before ``zero_grad``), counted over distinct tensor *storages* (a
  DTensor's local tensor; FSDP1's and fsdp_compile's shards are views of a flat buffer, which is
  then counted once, padding included). Max over ranks.
* ``steady_bytes`` -- bytes of every live ``malloc`` block in the rank's process just before a
  profiled step, after a ``gc.collect()`` (glibc ``mallinfo2``: what the process holds between
  steps, whoever allocated it: parameters, gradients, optimizer state, buffers a system keeps,
  Python, gloo; without the collection it also counted the previous profiled steps' results,
  kept in reference cycles). Max over ranks, median over profiled steps. ``total_bytes`` =
  steady + step peak growth: the step's high-water mark. The same process baseline (torch,
  Python) is in every system's figure.
* ``phases_ms`` -- where a step's wall time goes: ``forward``, ``backward`` and ``optimizer`` are
  timed around ``model(...)``, ``loss.backward()`` and ``opt.step()`` on the timed steps (median);
  ``collective`` and ``copy`` come from the profiled steps: the wall time of the step thread's
  outermost profiler events that issue or wait on a collective (``c10d::*``,
  ``_c10d_functional::*``, ``gloo:*``, ``*wait*``), and that pack/unpack communication buffers
  (``fsdp_compile::*`` copy ops, FSDP2's ``fsdp::*``/``FSDP::*copy*`` ops, ``*chunk_cat*``,
  ``split_with_sizes_copy``); ``compute`` is forward + backward minus both. Copies that Inductor
  generates inside a compiled graph have no profiler event of their own: they count as compute.
  Beside them, from ``getrusage`` around each timed step (the whole process, every thread):
  ``median_sys_ms``, the CPU time spent in the kernel, and ``median_page_faults``, the minor page
  faults. A buffer above glibc's 32 MiB mmap ceiling is mapped fresh at every allocation and
  faulted in page by page: these two columns show how much of that a step pays
  (benchmarks/README.md, "Where the CPU goes").

Also: ``final_loss`` (mean of the ranks' losses at the last step) and ``max_loss_diff_vs_ddp``
(largest difference from the ``ddp`` loss at any step, when ddp ran) to show that every
system trains the same model; and for compiled systems the Dynamo counters
(``graph_breaks`` = sum of ``counters["graph_break"]`` (breaks that resume in a new graph) and
``counters["unimplemented"]`` (breaks that make Dynamo run a whole frame eagerly, e.g. a break
inside a loop, or a generator frame); the table shows ``resumed+frame-skipped/graphs/ops
captured``, the JSON a few break reasons).
"""
from __future__ import annotations

import contextlib
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, ContextManager, Optional

import systems

PROFILED_STEPS = 5  # the last steps, run under the profiler (not timed)
_COLLECTIVE_PREFIXES = ("gloo:", "nccl:", "c10d::", "_c10d_functional::", "c10d_functional::")


# ---- one rank's steps -----------------------------------------------------------------------
def _storage_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        s = t.untyped_storage()
        if s.nbytes() == 0:
            continue
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


def _state_bytes(model, opt) -> dict[str, int]:
    import torch

    params = list(model.parameters())
    opt_tensors = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    out = {
        "params": _storage_bytes(params),
        "grads": _storage_bytes(p.grad for p in params),
        "optim": _storage_bytes(opt_tensors),
    }
    out["total"] = sum(out.values())
    return out


_COMM_MARKS = ("c10d::", "_c10d_functional::", "c10d_functional::", "gloo:", "nccl:")
_COPY_MARKS = ("fsdp_compile::", "fsdp::", "FSDP::all_gather_copy", "FSDP::post_backward_reduce_copy")
_COPY_WORDS = ("chunk_cat", "split_with_sizes_copy", "copy_in", "copy_out")
STEP_RANGE = "bench_step"


def _category(name: str):
    if name.startswith(_COMM_MARKS) or "wait" in name.lower():
        return "collective"
    if name.startswith(_COPY_MARKS) or any(w in name for w in _COPY_WORDS):
        return "copy"
    return None


def _phase_ms(prof) -> dict[str, float]:
    """Wall ms of the step thread's outermost collective and copy events (see the docstring)."""
    events = prof.events()
    step = next((e for e in events if e.name == STEP_RANGE), None)
    out = {"collective": 0.0, "copy": 0.0}
    if step is None:
        return out
    for e in events:
        if e.thread != step.thread:
            continue
        kind = _category(e.name)
        if kind is None:
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if _category(parent.name) is not None:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            out[kind] += (e.time_range.end - e.time_range.start) / 1e3
    return out


def _profile(step_fn, phases: list):
    """Run ``step_fn`` under the profiler -> (peak memory growth, collective name counts);
    appends the step's collective/copy ms to ``phases``."""
    from fsdp_compile.testing.memory import profile_step

    return profile_step(step_fn, _COLLECTIVE_PREFIXES, on_profile=lambda prof: phases.append(_phase_ms(prof)))


def train_step(model, opt, batch, scale: float, phase: Callable[[str], ContextManager] = contextlib.nullcontext):
    """One forward, backward and optimizer step on ``batch = (idx, targets)`` (no ``zero_grad``).
    Each phase runs inside ``phase(name)`` (``memory_peak.py`` passes profiler ranges).
    Returns the loss and each phase's wall ms."""
    idx, tgt = batch
    t0 = time.perf_counter()
    with phase("forward"):
        loss = model(idx, tgt)
    t1 = time.perf_counter()
    with phase("backward"):
        (loss * scale if scale != 1.0 else loss).backward()
    t2 = time.perf_counter()
    with phase("optimizer"):
        opt.step()
    t3 = time.perf_counter()
    return loss, {"forward": (t1 - t0) * 1e3, "backward": (t2 - t1) * 1e3, "optimizer": (t3 - t2) * 1e3}


def _worker(rank: int, world: int, name: str, steps: int, model_name: str) -> dict:
    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.distributed as dist
    from torch.profiler import record_function

    from fsdp_compile.testing.gpt import gpt_batch
    from fsdp_compile.testing.memory import bytes_in_use

    torch.set_num_threads(1)  # see the module docstring: OMP_NUM_THREADS comes too late here
    cache_dir = tempfile.mkdtemp(prefix=f"step_bench_{name}_r{rank}_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.compile_threads = 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    cfg = systems.model_config(model_name)
    model, scale = systems.build(name, rank, world, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=systems.LR)
    losses, times, cpu_times, timers = [], [], [], []

    state = {}

    data_rank = rank // systems.SYSTEMS[name].tp  # the ranks of one TP group read one batch

    def step(i, measure_state=False):
        with record_function(STEP_RANGE):
            loss, phase_ms = train_step(model, opt, gpt_batch(i, data_rank, cfg), scale)
        timers.append(phase_ms)
        if measure_state:  # no tensor is allocated here: safe inside the profiled step
            state.update(_state_bytes(model, opt))
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    peaks, colls, steady, phases, faults, sys_times = [], [], [], [], [], []
    n_profiled = min(PROFILED_STEPS, steps - 2)
    for i in range(steps):
        dist.barrier()
        if i >= steps - n_profiled:
            # the previous profiled step's results sit in reference cycles (~3 MiB per profile of
            # a small model, more with more events) until a collection: not what a system holds
            gc.collect()
            steady.append(bytes_in_use())
            peak, coll = _profile(lambda: step(i, measure_state=i == steps - 1), phases)
            peaks.append(peak)
            colls.append(coll)
            continue
        t0, c0, r0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        step(i)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_times.append(r1.ru_stime - r0.ru_stime)

    counters = torch._dynamo.utils.counters
    # A graph break that resumes in a new graph is counted in counters["graph_break"]; one that
    # makes Dynamo give up on the whole frame (a break inside a loop, e.g. FSDP2's disabled hooks
    # around each block call) stays in counters["unimplemented"]. Both are graph breaks here.
    resumed = counters.get("graph_break", Counter())
    skipped = counters.get("unimplemented", Counter())
    dynamo = {
        "graph_breaks": int(sum(resumed.values()) + sum(skipped.values())),
        "graph_breaks_resumed": int(sum(resumed.values())),
        "graph_breaks_frame_skipped": int(sum(skipped.values())),
        "break_reasons": [f"{n}x {r[:300]}" for r, n in [*resumed.items(), *skipped.items()][:6]],
        "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
        "calls_captured": int(counters.get("stats", {}).get("calls_captured", 0)),
        "frames": dict(counters.get("frames", {})),
    }
    timed = timers[1 : steps - n_profiled]  # the timed steps (not the first, not the profiled ones)
    return {"losses": losses, "times": times, "cpu_times": cpu_times, "peaks": peaks, "collectives": colls,
            "state": state, "dynamo": dynamo, "steady": steady, "phases": phases, "timers": timed,
            "faults": faults, "sys_times": sys_times}


def _worker_entry(rank: int, world: int, name: str, steps: int, model_name: str) -> dict:
    try:
        return _worker(rank, world, name, steps, model_name)
    except systems.SkipSystem as e:
        return {"skipped": str(e)}
    finally:
        shutil.rmtree(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"), ignore_errors=True)



# ---- the parent: run a system on fresh ranks, summarize ------------------------------------
def _summarize(name: str, ranks: list[dict], steps: int) -> dict:
    first = max(r["times"][0] for r in ranks) if ranks[0]["times"] else float("nan")
    # per timed step after the first (compile), the slowest rank's figure
    per_step, cpu_step, faults, sys_step = (
        [max(v) for v in zip(*(r[key][1:] for r in ranks))] for key in ("times", "cpu_times", "faults", "sys_times")
    )
    coll_names = Counter()
    for r in ranks:
        for step_colls in r["collectives"]:
            for k, v in step_colls.items():
                coll_names[k] = max(coll_names[k], v)
    same = all(c == r["collectives"][0] for r in ranks for c in r["collectives"])
    peaks = [max(p) for p in zip(*(r["peaks"] for r in ranks))]  # per profiled step, max over ranks
    gloo = {k: v for k, v in coll_names.items() if k.startswith(("gloo:", "nccl:")) and "barrier" not in k}
    kinds = Counter()
    for k, v in coll_names.items():
        if k.startswith("c10d::"):
            kinds[_kind(k)] += v
    mean_losses = [sum(ls) / len(ls) for ls in zip(*(r["losses"] for r in ranks))]
    steady = [max(s) for s in zip(*(r["steady"] for r in ranks))] if ranks[0]["steady"][0] is not None else []
    steady_bytes = int(statistics.median(steady)) if steady else None
    peak_bytes = int(statistics.median(peaks))
    phases = {k: statistics.median(max(r["timers"][j][k] for r in ranks) for j in range(len(ranks[0]["timers"])))
              for k in ("forward", "backward", "optimizer")} if ranks[0]["timers"] else {}
    for k in ("collective", "copy"):
        phases[k] = statistics.median(max(r["phases"][j][k] for r in ranks) for j in range(len(ranks[0]["phases"])))
    if "forward" in phases:
        phases["compute"] = phases["forward"] + phases["backward"] - phases["collective"] - phases["copy"]
    return {
        "name": name,
        "status": "ok",
        "steps": steps,
        "first_step_s": first,
        "median_step_ms": statistics.median(per_step) * 1e3 if per_step else float("nan"),
        "min_step_ms": min(per_step) * 1e3 if per_step else float("nan"),
        "max_step_ms": max(per_step) * 1e3 if per_step else float("nan"),
        "step_ms": [round(t * 1e3, 2) for t in per_step],
        "median_cpu_ms": statistics.median(cpu_step) * 1e3 if cpu_step else float("nan"),
        "cpu_ms": [round(t * 1e3, 2) for t in cpu_step],
        "page_faults": faults,
        "median_page_faults": statistics.median(faults) if faults else float("nan"),
        "sys_ms": [round(t * 1e3, 2) for t in sys_step],
        "median_sys_ms": statistics.median(sys_step) * 1e3 if sys_step else float("nan"),
        "peak_step_mem_bytes": peak_bytes,
        "steady_bytes": steady_bytes,
        "total_bytes": None if steady_bytes is None else steady_bytes + peak_bytes,
        "phases_ms": phases,
        "peak_step_mem_bytes_each": peaks,
        "collectives_same_every_profiled_step": same,
        "state_bytes": {k: max(r["state"][k] for r in ranks) for k in ranks[0]["state"]},
        "collectives_per_step": sum(gloo.values()),
        "collectives_by_backend_event": dict(sorted(gloo.items())),
        "collectives_by_kind": dict(sorted(kinds.items())),
        "collective_events_seen": dict(sorted(coll_names.items())),
        "losses": mean_losses,
        "final_loss": mean_losses[-1] if mean_losses else float("nan"),
        "dynamo": ranks[0]["dynamo"] if systems.SYSTEMS[name].compiled else None,
    }


def _kind(c10d_op: str) -> str:
    op = c10d_op.split("::", 1)[1].replace("_", "")
    for key, short in (("reducescatter", "rs"), ("allgather", "ag"), ("allreduce", "ar"),
                       ("broadcast", "bcast"), ("barrier", "barrier"), ("alltoall", "a2a")):
        if key in op:
            return short
    return op


def merge_rounds(name: str, rounds: list[dict]) -> dict:
    """One entry per system from its rounds: medians over every round's steps, the rest from the
    first round (compile time: the slowest round's), plus the per-round figures."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return rounds[0]
    merged = dict(ok[0])
    merged["rounds"] = len(ok)
    merged["first_step_s"] = max(r["first_step_s"] for r in ok)
    merged["step_ms"] = [t for r in ok for t in r["step_ms"]]
    merged["median_step_ms"] = statistics.median(merged["step_ms"])
    merged["min_step_ms"] = min(merged["step_ms"])
    merged["cpu_ms"] = [t for r in ok for t in r["cpu_ms"]]
    merged["median_cpu_ms"] = statistics.median(merged["cpu_ms"])
    for key, median_key in (("page_faults", "median_page_faults"), ("sys_ms", "median_sys_ms")):
        merged[key] = [x for r in ok for x in r[key]]
        merged[median_key] = statistics.median(merged[key]) if merged[key] else float("nan")
    merged["peak_step_mem_bytes_each"] = [b for r in ok for b in r["peak_step_mem_bytes_each"]]
    merged["peak_step_mem_bytes"] = int(statistics.median(merged["peak_step_mem_bytes_each"]))
    steadies = [r["steady_bytes"] for r in ok if r["steady_bytes"] is not None]
    merged["steady_bytes"] = int(statistics.median(steadies)) if steadies else None
    merged["total_bytes"] = None if merged["steady_bytes"] is None else merged["steady_bytes"] + merged["peak_step_mem_bytes"]
    merged["phases_ms"] = {k: statistics.median(r["phases_ms"][k] for r in ok) for k in ok[0]["phases_ms"]}
    merged["per_round"] = [{k: r[k] for k in ("median_step_ms", "first_step_s", "steady_bytes", "peak_step_mem_bytes")} for r in ok]
    return merged


def prepare_baseline(path: Path) -> None:
    """Make the checkout at ``path`` (an earlier commit, e.g. ``git worktree add /tmp/base <commit>``)
    runnable by a ``from_baseline`` system's ranks, which run with ``PYTHONPATH=path``: it gets this
    tree's ``fsdp_compile/testing/`` (the benchmark's helpers) and, for its ``passes/`` folder, the
    link ``fsdp_compile/passes``."""
    here = Path(__file__).resolve().parents[1]
    if not (path / "fsdp_compile").is_dir():
        raise SystemExit(f"--baseline {path}: no fsdp_compile/ package there; pass a checkout of this repository")
    shutil.copytree(here / "fsdp_compile" / "testing", path / "fsdp_compile" / "testing", dirs_exist_ok=True)
    link = path / "fsdp_compile" / "passes"
    if (path / "passes").is_dir() and not link.exists():
        link.symlink_to(Path("..") / "passes")


def run_system(name: str, world: int, steps: int, model_name: str, timeout: float, baseline: Optional[Path] = None) -> dict:
    """Train system ``name`` for ``steps`` steps on ``world`` fresh gloo ranks -> its summary (the
    keys the module docstring lists), or ``{"status": "skipped"|"failed", "reason": ...}``."""
    from fsdp_compile.testing.spawn import run_ranks

    t0 = time.perf_counter()
    saved_path = os.environ.get("PYTHONPATH")
    if systems.SYSTEMS[name].from_baseline:  # the ranks import fsdp_compile from the baseline checkout
        if baseline is None:
            return {"name": name, "status": "skipped", "reason": "no --baseline PATH given", "wall_s": 0.0}
        os.environ["PYTHONPATH"] = os.pathsep.join([str(baseline), str(Path(__file__).resolve().parent)])
    try:
        ranks = run_ranks(_worker_entry, world, name, steps, model_name, timeout=timeout)
        odd = [r for r in ranks if not isinstance(r, dict)]
        if odd:
            raise RuntimeError(f"a rank returned {type(odd[0]).__name__}, not a dict: {odd[0]!r:.2000}")
        skipped = next((r["skipped"] for r in ranks if "skipped" in r), None)
        res = {"name": name, "status": "skipped", "reason": skipped} if skipped else _summarize(name, ranks, steps)
    except Exception as e:  # noqa: BLE001 -- report and go on with the next system
        err = str(e) if isinstance(e, (RuntimeError, TimeoutError)) else traceback.format_exc()
        last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
        status = "skipped" if systems.SYSTEMS[name].optional else "failed"
        res = {"name": name, "status": status, "reason": last.strip(), "error": err}
        print(err, file=sys.stderr, flush=True)
    finally:
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
    res["wall_s"] = time.perf_counter() - t0
    if res["status"] == "ok":
        d = res["dynamo"]
        print(
            f"   ok in {res['wall_s']:.0f}s: first {res['first_step_s']:.2f}s, median "
            f"{res['median_step_ms']:.1f}ms, final loss {res['final_loss']:.5f}"
            + (f", graph breaks {d['graph_breaks']}, graphs {d['unique_graphs']}" if d else ""),
            flush=True,
        )
    else:
        print(f"   {res['status']} in {res['wall_s']:.0f}s: {res['reason']}", flush=True)
    return res
