"""The main job: train a small GPT (8 layers, tied head) with compiled FSDP on 2 CPU ranks.

    python examples/train_gpt.py [--steps 20] [--strategy FULL_SHARD] [--inner inductor]

Spawns 2 gloo ranks on this machine, shards the model with ``fsdp_compile.fully_shard``
(one unit per transformer block plus the root), compiles it with
``torch.compile(model, backend="fsdp_compile")`` and trains with AdamW. Prints the loss of every
step, the bytes each rank holds (parameters + gradients + Adam state) next to an unsharded
model, and the collectives the compiled graphs issue per step.
"""
from __future__ import annotations

import argparse
import time

import torch

import fsdp_compile
from fsdp_compile.testing.gpt import GPT, Block, GPTConfig
from fsdp_compile.testing.spawn import run_ranks


# what a collective stands for, where its name does not say it
_ROLE = {"all_to_all_single": " (the reduce-scatter on gloo)"}


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def counting_batch(step: int, rank: int, cfg: GPTConfig, batch: int = 8):
    """Learnable data: each row counts up from a random start with a random stride (mod vocab),
    and the target is the next number. Different on every rank and step."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    start = torch.randint(0, cfg.vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.seq + 1)) % cfg.vocab
    return seq[:, :-1], seq[:, 1:]


def train(rank: int, world: int, steps: int, strategy: str, inner: str) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    unsharded_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fsdp_compile.fully_shard(model, policy={Block}, strategy=strategy)
    compiled = torch.compile(model, backend=fsdp_compile.backend(inner=inner), fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        idx, targets = counting_batch(step, rank, model.cfg)
        loss = compiled(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    record = fsdp_compile.sharding_info(model).compiled_graphs[-1]
    return {
        "losses": losses,
        "times": times,
        "held": {
            "params": _storage_bytes(params),
            "grads": _storage_bytes(p.grad for p in params),
            "adam": _storage_bytes(state),
        },
        "unsharded": {"params": unsharded_param_bytes, "grads": unsharded_param_bytes, "adam": 2 * unsharded_param_bytes},
        "schedule": {k: [str(c) for c in v] for k, v in record.schedules.items()},
        "explain": fsdp_compile.explain(compiled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategy", default="FULL_SHARD", choices=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"])
    args = parser.parse_args()
    world = 2
    print(f"training GPT {GPTConfig()} with fsdp_compile ({args.strategy}, torch.compile inner={args.inner}) on {world} gloo ranks")
    results = run_ranks(train, world, args.steps, args.strategy, args.inner, timeout=900)
    print(results[0]["explain"])
    print("\nstep  " + "  ".join(f"loss rank{r}" for r in range(world)) + "   step time rank0")
    for step in range(args.steps):
        losses = "  ".join(f"{res['losses'][step]:10.4f}" for res in results)
        note = " (includes compile)" if step == 0 else ""
        print(f"{step:4d}  {losses}   {results[0]['times'][step]:.3f}s{note}")
    print("\nmemory held per rank (bytes)      params      grads    adam state    total")
    full = results[0]["unsharded"]
    print(f"  unsharded model            {full['params']:10d} {full['grads']:10d} {full['adam']:12d} {sum(full.values()):10d}")
    for r, res in enumerate(results):
        h = res["held"]
        share = sum(h.values()) / sum(full.values())
        print(f"  rank {r} (fsdp_compile)      {h['params']:10d} {h['grads']:10d} {h['adam']:12d} {sum(h.values()):10d}  ({share:.1%})")
    schedule = results[0]["schedule"]
    counts = {k: len(v) for k, v in schedule.items()}
    print(f"\ncollectives per step: {sum(counts.values())} ({', '.join(f'{k}: {n}' for k, n in counts.items())})")
    for graph, items in schedule.items():
        kinds = {}
        for item in items:
            kinds[item.split("(")[0]] = kinds.get(item.split("(")[0], 0) + 1
        print(f"  {graph}: " + ", ".join(f"{n} x {k}{_ROLE.get(k, '')}" for k, n in kinds.items()))


if __name__ == "__main__":
    main()
