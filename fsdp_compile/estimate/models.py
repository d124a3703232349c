"""The models ``fsdp_compile.estimate`` knows by name, and how a ``pkg.module:factory`` is loaded.

``llama3-8b`` / ``llama3-70b``: a Llama-3 decoder with the published shapes (8B: dim 4096, 32
layers, 32 heads, 8 KV heads, FFN 14336, vocab 128256, untied output; 70B: dim 8192, 80 layers,
64 heads, 8 KV heads, FFN 28672). ``readme-gpt``: ``fsdp_compile.testing.gpt.GPT()``. Each
model's ``forward(idx, targets)`` returns the mean cross-entropy loss; each has a unit class
(``UNIT_CLASSES``): its transformer block.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq: int = 8192


LLAMA3_8B = LlamaConfig(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336)
LLAMA3_70B = LlamaConfig(dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attention_norm(x)
        # -1 heads: under tensor parallelism each rank holds heads / tp of them
        q = self.wq(h).view(b, t, -1, self.head_dim)
        k = self.wk(h).view(b, t, -1, self.head_dim)
        v = self.wv(h).view(b, t, -1, self.head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    """A Llama-3 decoder (untied output head, RoPE, GQA, SwiGLU); the RoPE table is computed in
    ``forward`` (no buffers)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def _rope_table(self, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.cfg.dim // self.cfg.heads // 2
        freqs = 1.0 / (self.cfg.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
        angles = torch.outer(torch.arange(t, device=device, dtype=torch.float32), freqs)[None, :, None, :]
        return angles.cos(), angles.sin()

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tok_embeddings(idx)
        cos, sin = self._rope_table(idx.shape[1], idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def llama_tp_plan() -> dict:
    """A ``LlamaBlock``'s tensor-parallel plan (Megatron's, as torchtitan's): q, k, v, w1 and w3
    column-wise (their output features split over the tp ranks), o and w2 row-wise (their input
    features split, the output reduced)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in ("wq", "wk", "wv", "w1", "w3")},
            **{name: RowwiseParallel() for name in ("wo", "w2")}}


def tp_plan_of(model: nn.Module) -> dict[nn.Module, dict]:
    """Module -> its tensor-parallel plan: every ``LlamaBlock`` of ``model``; a model without
    one has no plan (``estimate(tp=...)`` then raises)."""
    return {m: llama_tp_plan() for m in model.modules() if isinstance(m, LlamaBlock)}


def llama3_8b() -> Llama:
    return Llama(LLAMA3_8B)


def llama3_70b() -> Llama:
    return Llama(LLAMA3_70B)


def readme_gpt() -> nn.Module:
    from fsdp_compile.testing.gpt import GPT

    return GPT()


NAMED: dict[str, Callable[[], nn.Module]] = {
    "llama3-8b": llama3_8b,
    "llama3-70b": llama3_70b,
    "readme-gpt": readme_gpt,
}


def unit_classes(model: nn.Module) -> set[type]:
    """The unit policy for ``model``: the classes of the entries of its ``nn.ModuleList``s (a
    transformer's blocks); empty (one unit) when it has none."""
    return {type(m) for sub in model.modules() if isinstance(sub, nn.ModuleList) for m in sub}


def resolve_factory(model) -> tuple[str, Callable[[], nn.Module]]:
    """``model`` (a known name, ``"pkg.module:factory"``, or a callable) -> (its name, a
    zero-argument factory building the ``nn.Module``)."""
    if callable(model) and not isinstance(model, str):
        return getattr(model, "__name__", type(model).__name__), model
    if not isinstance(model, str):
        raise TypeError(f"fsdp_compile.estimate: model must be a name, 'pkg.module:factory' or a callable, got {model!r}")
    if model in NAMED:
        return model, NAMED[model]
    if ":" not in model:
        raise ValueError(
            f"fsdp_compile.estimate: unknown model {model!r}; use one of {sorted(NAMED)} or "
            "'pkg.module:factory' (a zero-argument callable returning the nn.Module)"
        )
    module_name, attr = model.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"fsdp_compile.estimate: cannot load model factory {model!r}: {e}") from e
    return model, factory


def vocab_of(model: nn.Module) -> int:
    """Token ids for the example batch are drawn below this: the first embedding's size."""
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else 2


def default_seq(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    seq = getattr(cfg, "seq", None)
    return int(seq) if seq else 2048 if isinstance(model, Llama) else 32


__all__ = ["LLAMA3_8B", "LLAMA3_70B", "Llama", "LlamaBlock", "LlamaConfig", "NAMED", "resolve_factory", "unit_classes"]
