"""How much one gloo all-gather costs, served three ways, on 2 CPU ranks.

    python benchmarks/gloo_primitives.py [--sizes 16 25000 1575000 4200000] [--repeats 3]

For each size (elements per rank, fp32) it times, per call, the wall time and the CPU time of the
whole process (every thread: gloo's worker and transport threads too):

- ``functional``: what fsdp_compile issues, ``_c10d_functional.all_gather_into_tensor`` +
  ``wait_tensor`` on the one-worker twin (``fsdp_compile/gloo_worker.py``);
- ``send/recv``: the same gather as one ``send`` and one ``recv`` per peer, posted from the
  calling thread on a one-worker gloo backend (no worker-thread hop; a Python
  ``ProcessGroup`` subclass, so the functional op and ``wait_tensor`` serve it unchanged);
- each of the two again with compute (10 matmuls of 512x2048 by 2048x512) between issue and
  wait, as a prefetched gather runs in a training step.

Variants alternate (A B A B ...) over ``--repeats`` rounds; the table shows every round. The
lever this measured, and why it was not kept, is in benchmarks/README.md ("Lever: gathers as
send/recv pairs").
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _register_process_group

from fsdp_compile.gloo_worker import one_worker_group_name
from fsdp_compile.testing.spawn import run_ranks

_c10d = torch.ops._c10d_functional


class _SendRecvWork(dist.distributed_c10d.Work):
    """The sends and receives of one gather, waited on as one."""

    def __init__(self, works: list, output: torch.Tensor):
        super().__init__()
        self._works, self._output = works, output

    def wait(self, timeout=None) -> bool:
        works, self._works = self._works, []
        for work in works:
            work.wait()
        return True

    def result(self) -> list[torch.Tensor]:
        return [self._output]


class _SendRecvGroup(dist.ProcessGroup):
    """All-gathers as one send and one receive per peer on its gloo backend's transport."""

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self._tag = 0

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        (output,), (input,) = outputs, inputs
        gloo, me, peers = self._get_backend(torch.device("cpu")), self.rank(), range(self.size())
        self._tag += 1
        slots = output.view(self.size(), -1)
        works = [gloo.recv([slots[p]], p, self._tag) for p in peers if p != me]
        works += [gloo.send([input.reshape(-1)], p, self._tag) for p in peers if p != me]
        slots[me].copy_(input.reshape(-1))
        return _SendRecvWork(works, output)


def _send_recv_group(rank: int, world: int) -> str:
    from torch.distributed import ProcessGroupGloo
    from torch.distributed.distributed_c10d import _get_default_store

    name = "gloo_primitives/send_recv"
    store = dist.PrefixStore(f"{name}/", _get_default_store())
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_default_device()]
    options._threads = 1
    group = _SendRecvGroup(rank, world)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO,
                            ProcessGroupGloo(store, rank, world, options))
    group._set_group_name(name)
    _register_process_group(name, group)
    _KEEP.append(group)  # the registry does not own Python subclasses
    return name


_KEEP: list = []


def _groups(rank: int, world: int) -> dict[str, str]:
    return {"functional": one_worker_group_name(dist.group.WORLD), "send/recv": _send_recv_group(rank, world)}


def gathered_both_ways(rank: int, world: int, sizes: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    """What each variant gathers from ``arange(n) + 1000 * rank``, per size ``n`` (they must agree)."""
    groups, out = _groups(rank, world), {}
    for n in sizes:
        x = torch.arange(n, dtype=torch.float32) + 1000 * rank
        for variant, group in groups.items():
            out[variant, n] = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x, world, group))
    return out


def _measure(rank: int, world: int, sizes: list[int], repeats: int) -> dict:
    groups = _groups(rank, world)
    a, b = torch.randn(512, 2048), torch.randn(2048, 512)

    def gather(x, group, overlap):
        out = _c10d.all_gather_into_tensor(x, world, group)
        for _ in range(10 if overlap else 0):
            a @ b
        return _c10d.wait_tensor(out)

    results: dict = {}
    for n in sizes:
        x = torch.randn(n)
        calls = max(10, min(1000, int(3e7 // (n + 30_000))))
        for round_ in range(repeats):
            order = list(groups.items()) if round_ % 2 == 0 else list(groups.items())[::-1]
            for overlap in (False, True):
                for variant, group in order:
                    for _ in range(2):
                        gather(x, group, overlap)
                    dist.barrier()
                    t, before = time.perf_counter(), os.times()
                    for _ in range(calls // (5 if overlap else 1) or 1):
                        gather(x, group, overlap)
                    after, k = os.times(), calls // (5 if overlap else 1) or 1
                    wall = (time.perf_counter() - t) / k * 1e3
                    cpu = (after.user + after.system - before.user - before.system) / k * 1e3
                    key = (n, variant + (" + compute" if overlap else ""))
                    results.setdefault(key, []).append((wall, cpu))
    t = time.perf_counter()
    for _ in range(20):
        for _ in range(10):
            a @ b
    results["compute alone ms"] = (time.perf_counter() - t) / 20 * 1e3
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
