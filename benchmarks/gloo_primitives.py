"""How much one gloo all-gather costs, served three ways, on 2 CPU ranks.

    python benchmarks/gloo_primitives.py [--sizes 16 25000 1575000 4200000] [--repeats 3]

For each size (elements per rank, fp32) it times, per call, the wall time and the CPU time of the
whole process (every thread: gloo's worker and transport threads too):

- ``functional``: what fsdp_compile issues, ``_c10d_functional.all_gather_into_tensor`` +
  ``wait_tensor`` on the one-worker twin (``fsdp_compile/gloo_worker.py``);
- ``send/recv``: the same gather as one ``send`` and one ``recv`` per peer, posted from the
  calling thread on the twin's gloo backend (no worker-thread hop; a Python ``ProcessGroup``
  subclass, so the functional op and ``wait_tensor`` serve it unchanged);
- ``broadcasts``: the same gather written straight into its output, one in-place ``broadcast``
  per rank from that rank's slot, run by the twin's one worker like the functional op. gloo's
  own all-gather packs the input into a new flat tensor, gathers into a second one and copies
  that into the output; this variant has neither temporary nor copy;
- each of them again with compute (10 matmuls of 512x2048 by 2048x512) between issue and
  wait, as a prefetched gather runs in a training step.

Variants alternate (A B A B ...) over ``--repeats`` rounds; the table shows every round. The
levers this measured, and why neither was kept, are in benchmarks/README.md ("Levers tried and
not kept").
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future, _register_process_group

from fsdp_compile.gloo_worker import one_worker_group_name
from fsdp_compile.testing.spawn import run_ranks

_c10d = torch.ops._c10d_functional


class _SendRecvWork(dist.distributed_c10d.Work):
    """The sends and receives of one gather, waited on as one."""

    def __init__(self, works: list):
        super().__init__()
        self._works = works

    def wait(self, timeout=None) -> bool:
        works, self._works = self._works, []
        for work in works:
            work.wait()
        return True


class _SendRecvGroup(dist.ProcessGroup):
    """All-gathers as one send and one receive per peer on its gloo backend's transport."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self._tag = 0

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        (output,), (input,) = outputs, inputs
        gloo, me, peers = self._get_backend(torch.device("cpu")), self.rank(), range(self.size())
        self._tag += 1
        slots, flat = output.view(self.size(), -1), input.reshape(-1)
        works = [gloo.recv([slots[p]], p, self._tag) for p in peers if p != me]
        works += [gloo.send([flat], p, self._tag) for p in peers if p != me]
        slots[me].copy_(flat)
        return _SendRecvWork(works)


class _BroadcastGroup(dist.ProcessGroup):
    """All-gathers as one in-place broadcast per rank into the output's slots, on the backend's
    worker.

    Each broadcast's work holds tensors made here in Python. When gloo's worker thread drops the
    last C++ reference to such a tensor it must take the GIL (to release the Python object) while
    it holds its queue lock; the main thread, holding the GIL, may be waiting for that lock to
    queue the next collective: a deadlock. So every work stays referenced here until a later one
    has completed: the one worker runs them in order and lets go of each before starting the next
    (``ProcessGroupGloo::runLoop`` in torch 2.13). That is enough for this benchmark, which runs
    nothing else on the group. As the twin of a training step it was not: a step deadlocked the
    same way on an all-to-all's work (benchmarks/README.md, "Levers tried and not kept").
    """

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self._in_flight: list = []

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        (output,), (input,) = outputs, inputs
        gloo, me = self._get_backend(torch.device("cpu")), self.rank()
        slots = output.view(self.size(), -1)
        slots[me].copy_(input.reshape(-1))
        works = []
        for root in range(self.size()):
            options = dist.BroadcastOptions()
            options.rootRank = root
            works.append(gloo.broadcast([slots[root]], options))
        done = [i for i, work in enumerate(self._in_flight) if work.is_completed()]
        if done:
            del self._in_flight[: done[-1]]
        self._in_flight += works
        return _create_work_from_future(torch.futures.collect_all([w.get_future() for w in works]))


_KEEP: list = []  # c10d's name registry holds groups weakly


def _groups(rank: int, world: int) -> dict[str, str]:
    """Every variant's group name. The send/recv and broadcast groups run on the twin's own
    one-worker gloo backend (send/recv slots never collide with its collectives'), so the
    variants differ only in how the gather is served."""
    twin = one_worker_group_name(dist.group.WORLD)
    gloo = dist.distributed_c10d._resolve_process_group(twin)._get_backend(torch.device("cpu"))
    names = {"functional": twin}
    for variant, cls in (("send/recv", _SendRecvGroup), ("broadcasts", _BroadcastGroup)):
        names[variant] = _registered(cls(rank, world), gloo, f"gloo_primitives/{variant}").group_name
    return names


def _registered(group: dist.ProcessGroup, gloo, name: str) -> dist.ProcessGroup:
    """``group`` served by the gloo backend ``gloo``, registered (and kept) under ``name``."""
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    group._set_group_name(name)
    _register_process_group(name, group)
    _KEEP.append(group)
    return group


def gathered_every_way(rank: int, world: int, sizes: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    """What each variant gathers from ``arange(n) + 1000 * rank``, per size ``n`` (they must agree)."""
    groups, out = _groups(rank, world), {}
    for n in sizes:
        x = torch.arange(n, dtype=torch.float32) + 1000 * rank
        for variant, group in groups.items():
            out[variant, n] = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x, world, group))
    return out


def _per_call_ms(fn, calls: int) -> tuple[float, float]:
    """(wall, process CPU) ms per call of ``fn``, after two warm-up calls and a barrier."""
    fn(), fn()
    dist.barrier()
    t, before = time.perf_counter(), os.times()
    for _ in range(calls):
        fn()
    after = os.times()
    cpu = after.user + after.system - before.user - before.system
    return (time.perf_counter() - t) / calls * 1e3, cpu / calls * 1e3


def _measure(rank: int, world: int, sizes: list[int], repeats: int) -> dict:
    variants = list(_groups(rank, world).items())
    a, b = torch.randn(512, 2048), torch.randn(2048, 512)

    def compute():
        for _ in range(10):
            a @ b

    def gather(x, group, overlap):
        out = _c10d.all_gather_into_tensor(x, world, group)
        if overlap:
            compute()
        return _c10d.wait_tensor(out)

    results: dict = {}
    for n in sizes:
        x = torch.randn(n)
        calls = max(10, min(1000, int(3e7 // (n + 30_000))))
        for round_ in range(repeats):
            for overlap in (False, True):
                for variant, group in variants[round_ % len(variants):] + variants[: round_ % len(variants)]:
                    key = (n, variant + (" + compute" if overlap else ""))
                    k = max(1, calls // 5) if overlap else calls
                    results.setdefault(key, []).append(_per_call_ms(lambda: gather(x, group, overlap), k))
    results["compute alone ms"] = _per_call_ms(compute, 20)[0]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 25_000, 1_575_000, 4_200_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = run_ranks(_measure, 2, args.sizes, args.repeats, timeout=1800)[0]
    print(f"compute between issue and wait: {results.pop('compute alone ms'):.1f} ms alone")
    print("| elements per rank | variant | wall ms per call (per round) | process CPU ms per call (per round) |")
    print("|---|---|---|---|")
    for (n, variant), rounds in results.items():
        walls = ", ".join(f"{w:.2f}" for w, _ in rounds)
        cpus = ", ".join(f"{c:.2f}" for _, c in rounds)
        print(f"| {n:,} | {variant} | {walls} | {cpus} |")


if __name__ == "__main__":
    main()
