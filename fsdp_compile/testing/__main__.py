"""``python -m fsdp_compile.testing module:model_fn module:batch_fn [options]``: ``check_parity``
from the command line. Prints the per-step table; exit code 0 when every run matches its
reference, 1 on a divergence, 2 on a usage error.

    python -m fsdp_compile.testing my_models:build my_models:batch --steps 3 \\
        --strategies FULL_SHARD NO_SHARD --inner aot_eager --policy my_models:Block
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional

import torch


def _resolve(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise argparse.ArgumentTypeError(f"{spec!r} is not module:name (e.g. my_models:build_model)")
    try:
        value = importlib.import_module(module_name)
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise argparse.ArgumentTypeError(f"module {module_name!r} has no attribute {attr!r}") from None
    return value


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    from fsdp_compile import MixedPrecision
    from fsdp_compile.testing import check_parity

    sys.path.insert(0, "")  # like `python -m`: modules in the working directory are importable
    parser = argparse.ArgumentParser(
        prog="python -m fsdp_compile.testing",
        description="Compare DDP, eager fully_shard and compiled fully_shard on your model.",
    )
    parser.add_argument("model_fn", type=_resolve, help="module:function building the model (no arguments)")
    parser.add_argument("batch_fn", type=_resolve, help="module:function (step, rank) -> tuple of inputs")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--policy", type=_resolve, nargs="+", default=None, help="module:Class of unit modules")
    parser.add_argument("--param-dtype", type=_dtype, default=None, help="MixedPrecision param_dtype")
    parser.add_argument("--reduce-dtype", type=_dtype, default=None, help="MixedPrecision reduce_dtype")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    mp = None
    if args.param_dtype is not None or args.reduce_dtype is not None:
        mp = MixedPrecision(param_dtype=args.param_dtype, reduce_dtype=args.reduce_dtype)
    try:
        check_parity(
            args.model_fn, args.batch_fn, world_size=args.world_size, steps=args.steps,
            strategies=tuple(args.strategies), mixed_precision=mp,
            policy=set(args.policy) if args.policy else None, rtol=args.rtol, atol=args.atol,
            inner=args.inner, timeout=args.timeout,
        )
    except AssertionError as exc:
        print("\n" + str(exc).split("\n\n")[0], file=sys.stderr)  # the table is printed already
        return 1
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
