"""What is live at the high-water mark of one training step, and which op allocated it.

    python benchmarks/memory_peak.py --model 8x512 --configs fsdp_compile fsdp2 fsdp1   # ~1 min each

Each configuration (the names and models of ``step.py``) trains ``--steps`` steps on 2 gloo
ranks; the last runs under ``fsdp_compile.testing.memory.profile_step`` (the profiler with
``profile_memory=True``, as ``step.py`` runs it). Every allocation and free made through c10's
CPU allocator during that step is replayed in time order from the profiler's event tree (which,
unlike the flat event list, carries each block's address, so a free is matched to its
allocation). The running sum's maximum is the step's peak growth, the same
figure ``step.py`` reports; the blocks live at that moment are printed grouped by the ops that
allocated them (the innermost ``--depth`` enclosing profiler events), largest first, with each
block's size and allocation time. The blocks of ``--big`` MiB or more are also listed with their
lifetimes. Before that, what the process holds between steps (glibc ``mallinfo2``, as
``step.py``'s steady bytes): after ``init_process_group``, after wrapping the model, and before the
profiled step.

Reading it: the phase of the peak (``forward``, ``backward`` or ``optimizer``, the profiler ranges
of ``measure.train_step``) and what it holds, e.g. the forward's saved activations, the gathered
parameters, the communication buffers in flight. Inductor reuses a dead buffer's block for a later
tensor of the same size (``buf48 = buf28; del buf28  # reuse`` in its generated code), so in a
compiled graph a block is listed under the op that first allocated it: a gathered weight's copy-out
block can hold an activation of the same size by the time of the peak. Memory allocated before the
step (parameters, optimizer state, a system's kept buffers) is not in the peak growth:
``step.py``'s steady bytes are.
"""
from __future__ import annotations

import argparse
import collections
import gc
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))


PHASE_RANGES = ("forward", "backward", "optimizer")  # measure.train_step's phase names


def _site(names: tuple[str, ...], depth: int) -> str:
    phase = next((n for n in names if n in PHASE_RANGES), "-")
    return f"{phase}: " + " / ".join(n[:70] for n in names[-depth:])


@dataclass
class _Block:
    size: int
    names: tuple[str, ...]
    born: int  # index of its allocation event
    freed: Optional[int] = None  # index of its free event; None: live at the step's end


def analyse(allocations, depth: int = 2, big_mib: float = 5.0) -> str:
    """The report for one rank's profiled step (see the module docstring)."""
    if not allocations:
        return "no allocation events"
    t0 = allocations[0][0]
    ms = lambda i: (allocations[i][0] - t0) / 1e6  # noqa: E731 -- event index -> ms into the step
    blocks, open_blocks = [], {}  # every block allocated in the step; address -> its open block
    running = peak = peak_at = 0
    for i, (_, ptr, nbytes, names) in enumerate(allocations):
        if nbytes > 0:
            open_blocks[ptr] = len(blocks)
            blocks.append(_Block(nbytes, names, i))
        elif ptr in open_blocks:  # (a free of a block from before the step only lowers the sum)
            blocks[open_blocks.pop(ptr)].freed = i
        running += nbytes
        if running > peak:
            peak, peak_at = running, i
    at_peak = [b for b in blocks if b.born <= peak_at and (b.freed is None or b.freed > peak_at)]

    lines = [f"peak growth {peak / 2**20:.1f} MiB at {ms(peak_at):.0f} ms of the step; live then, by allocating op:"]
    sites = collections.defaultdict(list)
    for b in at_peak:
        sites[_site(b.names, depth)].append((b.size, b.born))
    for site, sized in sorted(sites.items(), key=lambda kv: -sum(size for size, _ in kv[1])):
        total = sum(size for size, _ in sized)
        if total < 2**20 / 4:
            continue
        sized.sort(reverse=True)
        shown = " ".join(f"{size / 2**20:.2f}@{ms(i):.0f}" for size, i in sized[:12] if size >= 2**16)
        more = f" (+{len(sized) - 12} more)" if len(sized) > 12 else ""
        lines.append(f"  {total / 2**20:7.2f} MiB in {len(sized):3d} blocks  {site}")
        lines.append(f"        MiB@ms: {shown}{more}")
    lines.append(f"blocks of {big_mib:g} MiB or more, allocated -> freed (ms; '-': still live at the step's end):")
    for b in blocks:  # in allocation order
        if b.size >= big_mib * 2**20:
            freed = "-" if b.freed is None else f"{ms(b.freed):.0f}"
            lines.append(f"  {ms(b.born):6.0f} -> {freed:>6}  {b.size / 2**20:6.2f} MiB  {_site(b.names, depth)}")
    return "\n".join(lines)


def _worker(rank: int, world: int, name: str, model_name: str, steps: int, depth: int, big_mib: float) -> str:
    import torch
    import torch.distributed as dist
    from torch.profiler import record_function

    import measure
    import systems
    from fsdp_compile import torch_private
    from fsdp_compile.testing.gpt import gpt_batch
    from fsdp_compile.testing.memory import bytes_in_use, profile_step

    torch.set_num_threads(1)
    held = {"process with its process group": bytes_in_use()}
    cfg = systems.model_config(model_name)
    model, scale = systems.build(name, rank, world, cfg)
    held["+ the wrapped model"] = bytes_in_use()
    opt = torch.optim.AdamW(model.parameters(), lr=systems.LR)

    def one_step(i):
        measure.train_step(model, opt, gpt_batch(i, rank, cfg), scale, phase=record_function)
        opt.zero_grad(set_to_none=True)

    for i in range(steps - 1):
        one_step(i)
        dist.barrier()
    gc.collect()
    held["+ optimizer state, compiled code, caches: steady"] = bytes_in_use()
    profiles = []  # step.py's profiler settings, so the peak is the one its table shows
    profile_step(lambda: one_step(steps - 1), on_profile=profiles.append)
    return _held(held) + "\n" + analyse(torch_private.profiled_cpu_allocations(profiles[0]), depth, big_mib)


def _held(held: dict) -> str:
    """glibc's bytes in use at each point before the profiled step, and the growth between them."""
    if None in held.values():
        return "between steps: no mallinfo2 here"
    lines, before = ["between steps (glibc mallinfo2, MiB):"], 0
    for what, now in held.items():
        lines.append(f"  {now / 2**20:7.1f}  ({(now - before) / 2**20:+7.1f})  {what}")
        before = now
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="8x512", help="a step.py model: readme, 8x512, L<layers>xD<dim>")
    parser.add_argument("--configs", nargs="+", default=["fsdp_compile", "fsdp2", "fsdp1"])
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the last is profiled")
    parser.add_argument("--depth", type=int, default=2, help="enclosing ops that name an allocation site")
    parser.add_argument("--big", type=float, default=5.0, help="list lifetimes of blocks of this many MiB or more")
    parser.add_argument("--rank", type=int, default=0, help="which rank's report to print")
    args = parser.parse_args(argv)

    from fsdp_compile.testing.spawn import run_ranks

    for name in args.configs:
        reports = run_ranks(_worker, 2, name, args.model, args.steps, args.depth, args.big, timeout=1800)
        print(f"== {name} ({args.model}), rank {args.rank}: {reports[args.rank]}\n")


if __name__ == "__main__":
    main()
