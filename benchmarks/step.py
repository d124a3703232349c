"""Training-step benchmark: the README GPT on 2 gloo ranks (CPU), one run, eleven configurations.

    python benchmarks/step.py [--steps 20] [--quick] [--only NAME[,NAME]] [--json PATH]

Configurations (``--only`` takes these names), each trained from the same seed on the same data
(``gpt_batch(step, rank)``, different per rank) with ``AdamW(lr=1e-3)``:

  ddp                 torch DistributedDataParallel
  ddp_compile         torch.compile(DDP(model))  (inductor)
  fsdp1               torch FSDP1 FullyShardedDataParallel(use_orig_params=True), auto-wrap per Block
  fsdp2               torch FSDP2 fully_shard per Block + root, eager
  fsdp2_compile       the same, then torch.compile (inductor)
  simplefsdp_compile  torchtitan SimpleFSDP data_parallel(mode="fully_shard") on a CPU mesh, then
                      torch.compile (inductor); skipped with the reason when torchtitan is missing
                      or fails on this model
  fsdp_compile_eager  fsdp_compile.fully_shard(model, policy={Block})
  fsdp_compile        the same, then torch.compile(model, backend="fsdp_compile")
  fsdp_compile_prefetch0   the same with fsdp_compile.backend(prefetch=0) (no all-gather prefetch)
  fsdp_compile_bucket1mb   the same with fsdp_compile.backend(bucket_bytes=1 MiB) (units bucketed)
  fsdp_compile_aten   fsdp_compile with FSDP_COMPILE_TRACED_KERNELS=aten: Inductor generates the
                      copy-in/copy-out code itself instead of calling the fused CPU ops

Every configuration runs in its own freshly spawned pair of processes with a new gloo process
group (``fsdp_compile.testing.spawn.run_ranks``), each rank with one intra-op thread, inductor
``compile_threads=1`` and an empty inductor cache directory of its own (so the first step is a cold
compile). A configuration that fails prints its error and the run goes on. ``run_ranks`` gives
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
  last optimizer step (before ``zero_grad``), counted over distinct tensor *storages* (a DTensor's local tensor; FSDP1's and
  fsdp_compile's shards are views of a flat buffer, which is then counted once, padding
  included). Max over ranks.

Also: ``final_loss`` (mean of the ranks' losses at the last step) and ``max_loss_diff_vs_ddp``
(largest difference from the ``ddp`` loss at any step, when ddp ran) to show that every
configuration trains the same model; and for compiled configurations the Dynamo counters
(``graph_breaks`` = sum of ``counters["graph_break"]`` (breaks that resume in a new graph) and
``counters["unimplemented"]`` (breaks that make Dynamo run a whole frame eagerly, e.g. a break
inside a loop, or a generator frame); the table shows ``resumed+frame-skipped/graphs/ops
captured``, the JSON a few break reasons).

SimpleFSDP notes: ``data_parallel`` replaces each module's parameter separately, which unties the
GPT's tied embedding/head weight; the benchmark re-ties them (``lm_head._parameters["weight"] =
tok_emb._parameters["weight"]``). Its gradients are reduced as a SUM (``Partial("sum")``), so the
loss is divided by the world size before ``backward()`` to get DDP's average.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

CONFIGS = [
    "ddp",
    "ddp_compile",
    "fsdp1",
    "fsdp2",
    "fsdp2_compile",
    "simplefsdp_compile",
    "fsdp_compile_eager",
    "fsdp_compile",
    "fsdp_compile_prefetch0",
    "fsdp_compile_bucket1mb",
    "fsdp_compile_aten",
]
COMPILED = {
    "ddp_compile", "fsdp2_compile", "simplefsdp_compile", "fsdp_compile",
    "fsdp_compile_prefetch0", "fsdp_compile_bucket1mb", "fsdp_compile_aten",
}
FSDP_COMPILE_BACKENDS = {  # name -> fsdp_compile.backend(...) options
    "fsdp_compile": {},
    "fsdp_compile_prefetch0": {"prefetch": 0},
    "fsdp_compile_bucket1mb": {"bucket_bytes": 1 << 20},
    "fsdp_compile_aten": {},
}
OPTIONAL = {"simplefsdp_compile"}
PROFILED_STEPS = 5  # the last steps, run under the profiler (not timed)
LR = 1e-3
SEED = 0
_COLLECTIVE_PREFIXES = ("gloo:", "nccl:", "c10d::", "_c10d_functional::", "c10d_functional::")


class SkipConfig(Exception):
    """The configuration cannot run here (an optional dependency is missing)."""


# ---- building each configuration (runs on every rank) --------------------------------------
def _build(name: str, rank: int, world: int):
    """-> (model to call, loss scale for backward). Called after the process group exists."""
    import torch
    import torch.distributed as dist

    from fsdp_compile.testing.gpt import GPT, Block

    torch.manual_seed(SEED)
    model = GPT()
    scale = 1.0
    if name in ("ddp", "ddp_compile"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        if name == "ddp_compile":
            model = torch.compile(model)
    elif name == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    elif name in ("fsdp2", "fsdp2_compile"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if name == "fsdp2_compile":
            model = torch.compile(model)
    elif name == "simplefsdp_compile":
        try:
            from torchtitan.experiments.graph_trainer.simple_fsdp import data_parallel
        except Exception as e:  # noqa: BLE001 -- any import failure means "not available"
            raise SkipConfig(f"torchtitan SimpleFSDP not importable: {type(e).__name__}: {e}") from e
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model = data_parallel(model, mesh, mode="fully_shard")
        # data_parallel distributes tok_emb.weight and lm_head.weight separately: re-tie them
        model.lm_head._parameters["weight"] = model.tok_emb._parameters["weight"]
        scale = 1.0 / world  # gradients are reduced with Partial("sum"), DDP averages
        model = torch.compile(model)
    elif name == "fsdp_compile_eager" or name in FSDP_COMPILE_BACKENDS:
        import fsdp_compile

        fsdp_compile.fully_shard(model, policy={Block})
        if name == "fsdp_compile_aten":
            os.environ["FSDP_COMPILE_TRACED_KERNELS"] = "aten"
        if name in FSDP_COMPILE_BACKENDS:
            model = torch.compile(model, backend=fsdp_compile.backend(**FSDP_COMPILE_BACKENDS[name]))
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    dist.barrier()
    return model, scale


def _storage_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t._local_tensor
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


def _profile(step_fn):
    """Run ``step_fn`` under the profiler -> (peak memory growth, collective name counts)."""
    from fsdp_compile.testing.memory import profile_step

    return profile_step(step_fn, _COLLECTIVE_PREFIXES)


def _worker(rank: int, world: int, name: str, steps: int) -> dict:
    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    from fsdp_compile.testing.gpt import gpt_batch

    torch.set_num_threads(1)  # see the module docstring: OMP_NUM_THREADS comes too late here
    cache_dir = tempfile.mkdtemp(prefix=f"step_bench_{name}_r{rank}_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.compile_threads = 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    model, scale = _build(name, rank, world)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, times, cpu_times = [], [], []

    state = {}

    def step(i, measure_state=False):
        idx, tgt = gpt_batch(i, rank)
        loss = model(idx, tgt)
        (loss * scale if scale != 1.0 else loss).backward()
        opt.step()
        if measure_state:  # no tensor is allocated here: safe inside the profiled step
            state.update(_state_bytes(model, opt))
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    peaks, colls = [], []
    n_profiled = min(PROFILED_STEPS, steps - 2)
    for i in range(steps):
        dist.barrier()
        if i >= steps - n_profiled:
            peak, coll = _profile(lambda: step(i, measure_state=i == steps - 1))
            peaks.append(peak)
            colls.append(coll)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

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
    return {"losses": losses, "times": times, "cpu_times": cpu_times, "peaks": peaks, "collectives": colls, "state": state, "dynamo": dynamo}


def _worker_entry(rank: int, world: int, name: str, steps: int) -> dict:
    try:
        return _worker(rank, world, name, steps)
    except SkipConfig as e:
        return {"skipped": str(e)}
    finally:
        shutil.rmtree(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"), ignore_errors=True)


# ---- the parent: run each configuration, summarize ------------------------------------------
def _summarize(name: str, ranks: list[dict], steps: int) -> dict:
    first = max(r["times"][0] for r in ranks) if ranks[0]["times"] else float("nan")
    per_step = [max(ts) for ts in zip(*(r["times"][1:] for r in ranks))]
    cpu_step = [max(ts) for ts in zip(*(r["cpu_times"][1:] for r in ranks))]
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
        "peak_step_mem_bytes": int(statistics.median(peaks)),
        "peak_step_mem_bytes_each": peaks,
        "collectives_same_every_profiled_step": same,
        "state_bytes": {k: max(r["state"][k] for r in ranks) for k in ranks[0]["state"]},
        "collectives_per_step": sum(gloo.values()),
        "collectives_by_backend_event": dict(sorted(gloo.items())),
        "collectives_by_kind": dict(sorted(kinds.items())),
        "collective_events_seen": dict(sorted(coll_names.items())),
        "losses": mean_losses,
        "final_loss": mean_losses[-1] if mean_losses else float("nan"),
        "dynamo": ranks[0]["dynamo"] if name in COMPILED else None,
    }


def _kind(c10d_op: str) -> str:
    op = c10d_op.split("::", 1)[1].replace("_", "")
    for key, short in (("reducescatter", "rs"), ("allgather", "ag"), ("allreduce", "ar"),
                       ("broadcast", "bcast"), ("barrier", "barrier"), ("alltoall", "a2a")):
        if key in op:
            return short
    return op


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def _table(results: list[dict]) -> str:
    head = ["config", "status", "first step s", "median ms", "min ms", "cpu ms", "peak step MiB (min-max)", "p+g+opt MiB",
            "coll/step", "breaks/graphs/ops", "final loss", "|dloss| vs ddp"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["name"], r["status"], *["-"] * (len(head) - 2)])
            continue
        kinds = " + ".join(f"{v} {k}" for k, v in r["collectives_by_kind"].items() if k != "barrier")
        dyn = r["dynamo"]
        rows.append([
            r["name"], "ok", f"{r['first_step_s']:.2f}", f"{r['median_step_ms']:.1f}", f"{r['min_step_ms']:.1f}",
            f"{r['median_cpu_ms']:.1f}",
            f"{_mib(r['peak_step_mem_bytes'])} ({_mib(min(r['peak_step_mem_bytes_each']))}-"
            f"{_mib(max(r['peak_step_mem_bytes_each']))})",
            _mib(r["state_bytes"]["total"]),
            f"{r['collectives_per_step']} = {kinds}",
            (f"{dyn['graph_breaks_resumed']}+{dyn['graph_breaks_frame_skipped']}/{dyn['unique_graphs']}"
             f"/{dyn['calls_captured']}") if dyn else "-",
            f"{r['final_loss']:.5f}",
            "-" if r.get("max_loss_diff_vs_ddp") is None else f"{r['max_loss_diff_vs_ddp']:.1e}",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 steps (a smoke run)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(CONFIGS)}")
    ap.add_argument("--json", default="bench_results/step.json")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if steps < 3:
        ap.error("--steps must be >= 3 (a first step, a timed step, a profiled step)")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or CONFIGS
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")

    import torch

    from fsdp_compile.testing.spawn import run_ranks

    world = 2
    print(f"torch {torch.__version__}, {world} gloo ranks, {steps} steps, configs: {', '.join(names)}", flush=True)
    results = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            ranks = run_ranks(_worker_entry, world, name, steps, timeout=args.timeout)
            odd = [r for r in ranks if not isinstance(r, dict)]
            if odd:
                raise RuntimeError(f"a rank returned {type(odd[0]).__name__}, not a dict: {odd[0]!r:.2000}")
            skipped = next((r["skipped"] for r in ranks if "skipped" in r), None)
            if skipped:
                res = {"name": name, "status": "skipped", "reason": skipped}
            else:
                res = _summarize(name, ranks, steps)
        except Exception as e:  # noqa: BLE001 -- report and go on with the next configuration
            err = str(e) if isinstance(e, (RuntimeError, TimeoutError)) else traceback.format_exc()
            last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
            status = "skipped" if name in OPTIONAL else "failed"
            res = {"name": name, "status": status, "reason": last.strip(), "error": err}
            print(err, file=sys.stderr, flush=True)
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
        results.append(res)

    ddp = next((r for r in results if r["name"] == "ddp" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and ddp is not None:
            r["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(r["losses"], ddp["losses"]))
    print()
    print(_table(results))
    for r in results:
        if r["status"] == "ok" and r["dynamo"] and r["dynamo"]["break_reasons"]:
            print(f"\n{r['name']} graph breaks (first reasons):")
            for reason in r["dynamo"]["break_reasons"]:
                print("  ", reason.replace("\n", " "))
    for r in results:
        if r["status"] != "ok":
            print(f"\n{r['name']}: {r['status']}: {r['reason']}")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "world": world, "steps": steps, "lr": LR, "seed": SEED,
            "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
