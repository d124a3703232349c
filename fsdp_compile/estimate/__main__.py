"""``python -m fsdp_compile.estimate --model llama3-70b --world-size 256 --mesh 8x32 --bf16
--activation-checkpointing``: will it fit, and what does each rank send per step? (``simulate.py``)"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from fsdp_compile.estimate import estimate

    parser = argparse.ArgumentParser(
        prog="python -m fsdp_compile.estimate",
        description="Simulate one compiled FSDP training step at any world size in this process "
        "(fake process group, fake tensors): memory per rank, its peak, collectives and bytes sent.",
    )
    parser.add_argument("--model", required=True, help="llama3-8b, llama3-70b, readme-gpt or pkg.module:factory")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--mesh", default=None,
                        help="RxS: HSDP, R replicas of S ranks (R*S*tp = world size)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks per data-parallel rank (Llama: q/k/v/w1/w3 column-wise, "
                        "o/w2 row-wise); FSDP shards the TP-local tensors over world size / tp ranks")
    parser.add_argument("--compile", default="model", choices=["model", "per-block"],
                        help="torch.compile(model), or every block compiled on its own (the rest eager)")
    parser.add_argument("--strategy", default="FULL_SHARD", help="FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 gathers and compute, float32 reductions")
    parser.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every unit (block)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (Llama: 2048)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "none"])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--trace-rank", type=int, action="append", default=None,
                        help="a rank to trace (repeatable; default 0)")
    parser.add_argument("--json", default=None, help="write the estimate as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of memory over the step here (matplotlib)")
    args = parser.parse_args(argv)
    try:
        est = estimate(
            args.model, args.world_size, mesh=args.mesh, strategy=args.strategy, bf16=args.bf16,
            activation_checkpointing=args.activation_checkpointing, batch=args.batch, seq=args.seq,
            optimizer=args.optimizer, backend=args.backend, trace_ranks=tuple(args.trace_rank or (0,)),
            tp=args.tp, compile=args.compile,
        )
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(est.table())
    print(f"estimated in {est.seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(est.to_json(), f, indent=1)
    if args.plot:
        est.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
