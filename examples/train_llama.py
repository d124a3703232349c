"""Train a Hugging Face Llama with compiled FSDP, the way a torchrun job is written.

    torchrun --nproc-per-node 2 examples/train_llama.py --steps 20
    python examples/train_llama.py --steps 20          # not under torchrun: spawns 2 local ranks
    torchrun --nproc-per-node 4 examples/train_llama.py --hsdp 2   # 2 replicas x 2 shards
    torchrun --nproc-per-node 4 examples/train_llama.py --tp 2     # dp 2 x tp 2
    torchrun --nproc-per-node 8 examples/train_llama.py --hsdp 2 --tp 2   # 2 replicas x 2 shards x tp 2

The model is a tiny random-init ``LlamaForCausalLM`` built from a config (sizes are flags; no
download). It is built on the meta device, materialized and sharded by ``fully_shard`` one
module at a time (``param_init_fn=model._init_weights``: HF's own initializer), optionally
checkpointed (``--activation-checkpointing``), optionally hybrid sharded (``--hsdp R``: R replicas
on a 2-D ("replicate", "shard") device mesh, each replica sharded over world/R ranks), optionally
tensor parallel (``--tp T``: ``parallelize_module`` over T ranks of a ("dp", "tp") mesh, or
("replicate", "shard", "tp") with ``--hsdp``: q/k/v and the MLP's gate/up projections
``ColwiseParallel``, o and down ``RowwiseParallel``; ``fully_shard`` then shards the TP-local
parameters over the data-parallel dims, and the ranks of one TP group read the same batch),
compiled with ``backend="fsdp_compile"`` and trained with AdamW on learnable synthetic data (counting sequences). With CUDA it uses nccl and
the local GPU, else gloo and the CPU. Rank 0 prints each step's loss, tokens/s and every rank's
memory, and a progress bar when its output is a terminal; ``--checkpoint-dir`` saves the model
and optimizer with ``torch.distributed.checkpoint`` at the end.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--strategy", default="FULL_SHARD",
        choices=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"],
        help="with --hsdp, FULL_SHARD means HYBRID_SHARD and SHARD_GRAD_OP HYBRID_SHARD_ZERO2",
    )
    p.add_argument("--hsdp", type=int, default=0, metavar="R",
                   help="hybrid sharding: R replicas, each sharded over world/R ranks")
    p.add_argument("--tp", type=int, default=1, metavar="T",
                   help="tensor parallelism over T ranks (heads and kv-heads divisible by T); data parallel over world/T")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (MixedPrecision), fp32 shards")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every decoder layer")
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--checkpoint-dir", default=None, help="dcp.save model+optimizer here at the end")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    return p.parse_args(argv)


def counting_batch(step: int, rank: int, vocab: int, seq: int, batch: int):
    """Each row counts up from a random start with a random stride (mod vocab): learnable."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(seq)) % vocab


def build_model(args, meta: bool = True):
    """The Llama of ``args``; on the meta device (``fully_shard``'s ``param_init_fn`` materializes
    it), or initialized by HF in memory (``meta=False``: tensor parallelism distributes real
    tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, tie_word_embeddings=True,
    )
    if not meta:
        return LlamaForCausalLM(config)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def tensor_parallel_plan() -> dict:
    """Megatron-style TP of a decoder layer: Colwise in, Rowwise out of attention and the MLP."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {
        "self_attn.q_proj": col, "self_attn.k_proj": col, "self_attn.v_proj": col, "self_attn.o_proj": row,
        "mlp.gate_proj": col, "mlp.up_proj": col, "mlp.down_proj": row,
    }


def device_meshes(args, world: int, device_type: str):
    """-> (fully_shard's device_mesh, the TP mesh, this rank's data-parallel rank, the number of
    data-parallel ranks); meshes None when not used."""
    from torch.distributed.device_mesh import init_device_mesh

    replicas, tp = args.hsdp or 1, args.tp
    if world % (replicas * tp):
        raise SystemExit(f"--hsdp {args.hsdp} --tp {tp}: the world size {world} is not a multiple of {replicas * tp}")
    if args.heads % tp or args.kv_heads % tp:
        raise SystemExit(f"--tp {tp}: --heads {args.heads} and --kv-heads {args.kv_heads} must be multiples of it")
    dp = world // tp
    if tp == 1 and not args.hsdp:
        return None, None, dist.get_rank(), dp
    names = ("replicate", "shard") if args.hsdp else ("dp",)
    shape = (replicas, dp // replicas) if args.hsdp else (dp,)
    if tp == 1:
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        return mesh, None, dist.get_rank(), dp
    mesh = init_device_mesh(device_type, (*shape, tp), mesh_dim_names=(*names, "tp"))
    dp_mesh = mesh[names]
    dp_rank = sum(mesh.get_local_rank(name) * math.prod(shape[i + 1:]) for i, name in enumerate(names))
    return dp_mesh, mesh["tp"], dp_rank, dp


def memory_bytes(device: torch.device) -> int:
    """This process's high-water mark: CUDA's allocator peak, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(args) -> None:
    import fsdp_compile
    from torch.distributed.tensor import DTensor
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same init on every rank
    mesh, tp_mesh, dp_rank, dp = device_meshes(args, world, device.type)
    model = build_model(args, meta=tp_mesh is None)
    full_numel = sum(p.numel() for p in model.parameters())
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    mp = fsdp_compile.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    if tp_mesh is not None:
        from torch.distributed.tensor.parallel import parallelize_module

        for layer in model.model.layers:
            parallelize_module(layer, tp_mesh, tensor_parallel_plan())
    fsdp_compile.fully_shard(
        model, device_mesh=mesh, policy={LlamaDecoderLayer}, strategy=args.strategy, mixed_precision=mp,
        param_init_fn=model._init_weights if tp_mesh is None else None,
    )
    strategy = fsdp_compile.sharding_info(model).units[0].strategy.name
    forward = model if args.eager else torch.compile(model, backend=fsdp_compile.backend(inner=args.inner), fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    shard_numel = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    if rank == 0:
        mode = "eager" if args.eager else f"compiled ({args.inner})"
        print(
            f"Llama {args.layers}x{args.hidden} ({full_numel / 1e6:.2f} M params, {shard_numel / 1e6:.2f} M on each "
            f"rank), {world} ranks on {device.type} ({dist.get_backend()}), {strategy}, {mode}"
            + (f", {args.hsdp} replicas x {dp // args.hsdp} shards" if args.hsdp else "")
            + (f", dp {dp} x tp {args.tp}" if args.tp > 1 else "")
            + (", bf16" if args.bf16 else "") + (", activation checkpointing" if args.activation_checkpointing else ""),
            flush=True,
        )
    bar = None
    if rank == 0 and sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.steps, unit="step")
    tokens_per_step = args.batch * args.seq * dp
    for step in range(args.steps):
        start = time.perf_counter()
        ids = counting_batch(step, dp_rank, args.vocab, args.seq, args.batch).to(device)
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss_value = loss.item()
        elapsed = time.perf_counter() - start
        memory = [None] * world
        dist.all_gather_object(memory, memory_bytes(device))
        if rank == 0:
            line = (
                f"step {step:4d}  loss {loss_value:.4f}  {tokens_per_step / elapsed:9.0f} tokens/s  "
                "memory/rank " + " ".join(f"{m / 2**20:.0f}MiB" for m in memory)
            )
            if bar is not None:
                bar.set_postfix_str(f"loss {loss_value:.4f}")
                bar.update()
                bar.write(line)
            else:
                print(line, flush=True)
    if bar is not None:
        bar.close()
    if args.checkpoint_dir:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint_dir)
        if rank == 0:
            print(f"saved model and optimizer to {args.checkpoint_dir}", flush=True)
    if rank == 0:
        print(f"done: {args.steps} steps, final loss {loss_value:.4f}", flush=True)


def _init_and_run(args) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    try:
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        main(args)
    finally:
        dist.destroy_process_group()


def _spawned(local_rank: int, world: int, port: int, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
        LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
    )
    _init_and_run(args)


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        _init_and_run(arguments)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(arguments.nproc, free_port, arguments), nprocs=arguments.nproc)
