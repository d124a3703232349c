"""How the first compiled step's time grows with the parameters of one unit.

Owns nothing in the library. A ``nn.Sequential`` of N ``Linear(8, 8)`` layers (2N parameters),
sharded as a single unit with ``fully_shard`` on 2 gloo ranks, compiled with the
``fsdp_compile`` backend on the ``aot_eager`` inner compiler (so no Inductor C++ compile is
counted), one forward and backward. Reports the wall time of that first step and Dynamo's own
split: bytecode tracing (where every parameter read is traced) and fake-tensor execution.

    python benchmarks/trace_time.py [--layers 25 50 100]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import fsdp_compile
from fsdp_compile.testing.spawn import run_ranks


def first_step(rank: int, world: int, layers: int) -> dict:
    torch.manual_seed(0)
    model = fsdp_compile.fully_shard(nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)]))
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"), fullgraph=True)
    start = time.perf_counter()
    compiled(torch.randn(4, 8)).sum().backward()
    seconds = time.perf_counter() - start
    from torch._dynamo.utils import compilation_time_metrics

    def total(name):
        return sum(compilation_time_metrics.get(name, []))

    return {"first step s": seconds, "bytecode tracing s": total("bytecode_tracing"), "fake values s": total("get_fake_value")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[25, 50, 100])
    args = parser.parse_args()
    print(f"{'params/unit':>11} | {'first step s':>12} | {'bytecode tracing s':>18} | {'fake values s':>13}")
    for layers in args.layers:
        row = run_ranks(first_step, 2, layers, timeout=900)[0]
        print(f"{2 * layers:>11} | {row['first step s']:>12.1f} | {row['bytecode tracing s']:>18.2f} | {row['fake values s']:>13.2f}")


if __name__ == "__main__":
    main()
