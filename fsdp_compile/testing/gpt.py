"""A small GPT (pre-norm transformer, by default a tied embedding/output head) used by the README job, the
tests and the benchmarks. Plain PyTorch: nothing in it knows about sharding."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 96
    dim: int = 64
    layers: int = 8
    heads: int = 4
    seq: int = 32
    ffn: int = 0  # hidden width of each block's MLP; 0 means 4 * dim
    tied: bool = True  # the output head shares the token embedding's weight

    @property
    def hidden(self) -> int:
        return self.ffn or 4 * self.dim


# The "not tiny" GPT of the benchmarks: 8 blocks x d 512, ffn 2048, vocab 8192,
# seq 128, untied head; 33.7 M parameters.
GPT_8X512 = GPTConfig(vocab=8192, dim=512, layers=8, heads=8, seq=128, ffn=2048, tied=False)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_emb = nn.Parameter(torch.randn(cfg.seq, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def gpt_batch(step: int, rank: int, cfg: GPTConfig = GPTConfig(), batch: int = 4):
    """Deterministic (idx, targets) for ``step`` on ``rank``: different data on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def param_groups(model: nn.Module) -> list[dict]:
    """The three optimizer groups the parity tests use: matrix weights (lr 1e-2, wd 0.1),
    biases (lr 1e-3, wd 0.01), everything else (the optimizer's defaults)."""
    weights, biases, rest = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:
            weights.append(p)
        elif name.endswith("bias"):
            biases.append(p)
        else:
            rest.append(p)
    return [
        {"params": weights, "lr": 1e-2, "weight_decay": 0.1},
        {"params": biases, "lr": 1e-3, "weight_decay": 0.01},
        {"params": rest},
    ]
