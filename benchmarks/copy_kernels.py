"""Benchmark of the fused copy-in/copy-out ops (fsdp_compile.kernels) against plain torch.

Owns nothing in the library. For N tensors (10/100/1000) totalling 64 MiB / 512 MiB of fp32
(full parameters, world size 2 layout, no padding), reports effective GB/s (bytes read + bytes
written, each counted once) of each op next to:
  copy_   ``dst.copy_(src)`` of the same bytes into a preallocated tensor (the memory bound), and
  clone   ``src.clone()`` (allocation + copy, the bound for ops that return a fresh buffer), and
  naive   a per-tensor loop (pad with torch.cat, then torch.cat the pieces).
Every op allocates its output, so it pays page faults on a fresh allocation, like ``clone``.
On CUDA the same script measures the Triton path (the default there above the size threshold),
and adds "traced" columns: the ``wrap_triton`` kernels a compiled graph launches
(``kernels/triton_traced.py``), called eagerly.

    python benchmarks/copy_kernels.py [--quick] [--json out.json] [--device cuda]

``--per-call`` instead times one call of each opaque ``fsdp_compile::*_fused`` op (what a
compiled CPU graph runs per copy) on a small unit, the README GPT's block at world 2, against the
same body called directly and through a ``torch.library.custom_op`` twin: what each call costs
on top of its copy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from fsdp_compile import kernels as K

WORLD = 2


def chunk_rows(dim0: int, world: int) -> int:
    """Rows of each rank's shard: ``ceil(dim0 / world)`` (``torch.chunk``'s split)."""
    return -(-dim0 // world)


def padded_numels(shapes, world: int) -> list[int]:
    """Elements of each parameter's padded shard in a rank's slot."""
    return [chunk_rows(s[0], world) * math.prod(s[1:]) for s in shapes]


def pack_shapes(shapes) -> tuple[list[int], list[int]]:
    """The shapes as the opaque ops' schema takes them: every dim in a row, and each ndim."""
    return [d for s in shapes for d in s], [len(s) for s in shapes]


# The opaque ops' bodies, through the public ``kernels.eager_kernels``: what each op runs per call.
def _body_all_gather_copy_in(shards: list[torch.Tensor], padded: list[int], dtype: torch.dtype) -> torch.Tensor:
    return K.eager_kernels(shards[0].device, sum(padded)).all_gather_copy_in(shards, padded, dtype)


def _body_all_gather_copy_out(gathered: torch.Tensor, flat: list[int], ndims: list[int], world: int) -> list[torch.Tensor]:
    ends = list(itertools.accumulate(ndims))
    shapes = [tuple(flat[end - n : end]) for n, end in zip(ndims, ends)]
    out = [torch.empty(s, dtype=gathered.dtype, device=gathered.device) for s in shapes]
    K.eager_kernels(gathered.device, gathered.numel()).all_gather_copy_out(gathered.reshape(-1), shapes, world, out)
    return out


def _body_reduce_scatter_copy_in(grads: list[torch.Tensor], world: int, dtype: torch.dtype) -> torch.Tensor:
    return K.eager_kernels(grads[0].device, sum(g.numel() for g in grads)).reduce_scatter_copy_in(grads, world, dtype)


def _timeit(fn, device, iters):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _shapes(n, total_bytes):
    rows = max(WORLD, (total_bytes // 4 // n // 64) // WORLD * WORLD)
    return [(rows, 64) for _ in range(n)]


def _naive_ag_copy_in(shards, padded, dtype):
    return torch.cat([torch.cat([s.reshape(-1), s.new_zeros(p - s.numel())]).to(dtype) for s, p in zip(shards, padded)])


def _naive_ag_copy_out(gathered, shapes):
    g2 = gathered.view(WORLD, -1)
    outs, off = [], 0
    for s in shapes:
        p = chunk_rows(s[0], WORLD) * 64
        outs.append(torch.cat([g2[r, off : off + p] for r in range(WORLD)]).view(s))
        off += p
    return outs


def _naive_rs_copy_in(grads, dtype):
    pieces = [torch.cat([g, g.new_zeros((WORLD * chunk_rows(g.shape[0], WORLD) - g.shape[0], 64))]).view(WORLD, -1) for g in grads]
    return torch.cat(pieces, dim=1).flatten().to(dtype)


def run(n, total_bytes, device, iters):
    shapes = _shapes(n, total_bytes)
    fulls = [torch.randn(s, device=device) for s in shapes]
    padded = list(padded_numels(shapes, WORLD))
    shards = [f[: chunk_rows(f.shape[0], WORLD)] for f in fulls]
    full_bytes = sum(f.numel() for f in fulls) * 4
    shard_bytes = full_bytes // WORLD
    gathered = torch.randn(WORLD * sum(padded), device=device)
    src_full, dst_full = torch.randn(full_bytes // 4, device=device), torch.empty(full_bytes // 4, device=device)
    src_half, dst_half = src_full[: shard_bytes // 4], dst_full[: shard_bytes // 4]

    def gbps(bytes_moved, fn):
        return 2 * bytes_moved / _timeit(fn, device, iters) / 1e9

    row = {"tensors": n, "MiB": total_bytes >> 20}
    row["copy_ (full)"] = gbps(full_bytes, lambda: dst_full.copy_(src_full))
    row["clone (full)"] = gbps(full_bytes, lambda: src_full.clone())
    row["copy_ (shard)"] = gbps(shard_bytes, lambda: dst_half.copy_(src_half))
    row["clone (shard)"] = gbps(shard_bytes, lambda: src_half.clone())
    row["ag_copy_in"] = gbps(shard_bytes, lambda: K.all_gather_copy_in(shards, padded, torch.float32))
    row["ag_copy_in naive"] = gbps(shard_bytes, lambda: _naive_ag_copy_in(shards, padded, torch.float32))
    row["ag_copy_out"] = gbps(full_bytes, lambda: K.all_gather_copy_out(gathered, shapes, WORLD))
    row["ag_copy_out naive"] = gbps(full_bytes, lambda: _naive_ag_copy_out(gathered, shapes))
    row["rs_copy_in"] = gbps(full_bytes, lambda: K.reduce_scatter_copy_in(fulls, WORLD, torch.float32))
    row["rs_copy_in naive"] = gbps(full_bytes, lambda: _naive_rs_copy_in(fulls, torch.float32))
    if device.type == "cuda":
        from fsdp_compile.kernels import triton_traced as T

        row["ag_copy_in traced"] = gbps(shard_bytes, lambda: T.all_gather_copy_in(shards, padded, torch.float32))
        row["ag_copy_out traced"] = gbps(full_bytes, lambda: T.all_gather_copy_out_flat(gathered, shapes, WORLD))
        row["rs_copy_in traced"] = gbps(full_bytes, lambda: T.reduce_scatter_copy_in(fulls, WORLD, torch.float32))
    return row


_CUSTOM_OP_TWINS: dict = {}  # op name -> its custom_op twin (an op is defined once per process)


def _readme_block_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of one block of the README GPT (``GPTConfig()``)."""
    from fsdp_compile.testing.gpt import GPT, GPTConfig

    return [tuple(p.shape) for p in GPT(GPTConfig()).blocks[0].parameters()]


def per_call(rounds: int = 7, calls: int = 2000) -> list[dict]:
    """Median us per call, over ``rounds`` of ``calls``, of each copy op three ways. Every way's
    output is first checked against the rank-major layout built from ``torch.chunk``."""
    shapes = _readme_block_shapes()
    assert all(s[0] % WORLD == 0 for s in shapes), "the reference below assumes no padding"
    fulls = [torch.randn(s) for s in shapes]
    chunks = [torch.chunk(f, WORLD) for f in fulls]  # chunks[i][r]: rank r's shard of parameter i
    slots = [torch.cat([c[r].reshape(-1) for c in chunks]) for r in range(WORLD)]
    gathered = torch.cat(slots)
    padded = padded_numels(shapes, WORLD)
    flat, ndims = pack_shapes(shapes)
    fused, f32 = torch.ops.fsdp_compile, torch.float32
    cases = {  # name: (arguments, our library op, the body it runs, the expected output)
        "all_gather_copy_out": ((gathered, flat, ndims, WORLD), fused.all_gather_copy_out_fused.default,
                                _body_all_gather_copy_out, fulls),
        "all_gather_copy_in": (([c[0] for c in chunks], padded, f32), fused.all_gather_copy_in_fused.default,
                               _body_all_gather_copy_in, slots[0]),
        "reduce_scatter_copy_in": ((fulls, WORLD, f32), fused.reduce_scatter_copy_in_fused.default,
                                   _body_reduce_scatter_copy_in, gathered),
    }
    rows = []
    for name, (args, library_op, body, expected) in cases.items():
        if name not in _CUSTOM_OP_TWINS:
            torch.library.custom_op(f"fsdp_compile_bench::{name}", mutates_args=())(body)
            _CUSTOM_OP_TWINS[name] = getattr(torch.ops.fsdp_compile_bench, name).default
        ways = {"custom_op": _CUSTOM_OP_TWINS[name], "library op (ours)": library_op, "body alone": body}
        for way, fn in ways.items():
            torch.testing.assert_close(fn(*args), expected, rtol=0, atol=0, msg=lambda m: f"{name}, {way}: {m}")
        times: dict = {way: [] for way in ways}
        for fn in ways.values():  # warm-up
            for _ in range(calls // 10):
                fn(*args)
        for _ in range(rounds):  # interleaved, so drift hits every way alike
            for way, fn in ways.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                times[way].append((time.perf_counter() - t0) / calls * 1e6)
        rows.append({"op": name, **{way: sorted(t)[len(t) // 2] for way, t in times.items()}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations (smoke run)")
    parser.add_argument("--json", help="write the rows to this path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--per-call", action="store_true", help="us per call of the opaque CPU ops, 3 ways")
    args = parser.parse_args()
    if args.per_call:
        torch.set_num_threads(1)  # as each rank runs
        rows = per_call(rounds=3, calls=200) if args.quick else per_call()
        print("us per call (median), one thread, the README GPT's block at world 2")
        for r in rows:
            print(" | ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{v:>22}" for k, v in r.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    device = torch.device(args.device)
    sizes = [(10, 1 << 20), (100, 4 << 20)] if args.quick else [
        (n, mib << 20) for mib in (64, 512) for n in (10, 100, 1000)
    ]
    run(10, 1 << 20, device, 1)  # warm-up, not reported: first calls, allocator
    rows = []
    for n, total in sizes:
        # 64 MiB copies take ~1 ms and their median over 7 runs still moved by +-10% run to run
        # (5 repeats of one row: 72-95% of copy_ with 7 runs, 84-90% with 31).
        iters = 3 if args.quick else (31 if total <= 64 << 20 else 7)
        rows.append(run(n, total, device, iters))
        if not args.quick and total >= 512 << 20:
            torch.cuda.empty_cache() if device.type == "cuda" else None
    cols = list(rows[0])
    print(f"device={device} threads={torch.get_num_threads()} world={WORLD}  (GB/s = (read+write bytes)/s, median)")
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>17.2f}" if isinstance(r[c], float) else f"{r[c]:>17}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
