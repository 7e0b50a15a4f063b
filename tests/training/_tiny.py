"""Tiny models (tests/tiny_models.py with the training tests' sizes) and synthetic tasks they learn in seconds."""
import torch
from tiny_models import fused

V = 64  # vocabulary of the tiny models


def model(preset: str = "llama-tiny", seed: int = 0, **overrides):
    """A tiny model with transformers' initialisation (normal(0, 0.02) weights, zero biases): the
    model layer keeps PyTorch's defaults, whose N(0, 1) embeddings make tied heads start far from
    uniform (an initial MLM loss near 20 instead of log V)."""
    return fused(preset, seed=seed, init="normal", **{"vocab_size": V, "max_seq_len": 64, **overrides})


def counting(n: int, length: int = 16, seed: int = 0, vocab: int = V, low: int = 4) -> list[dict]:
    """Rows x, x+s, x+2s, ... (mod the vocabulary above `low`), s in {1, 2, 3}: next-token
    prediction is learnable from two tokens of context."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab - low, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = low + (start + step * torch.arange(length)) % (vocab - low)
    return [{"input_ids": row} for row in ids]


def clm_rows(n: int, length: int = 16, seed: int = 0) -> list[dict]:
    return [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in counting(n, length, seed)]


def periodic(n: int, length: int = 16, period: int = 4, seed: int = 0, vocab: int = V, low: int = 4) -> list[dict]:
    """Rows repeating a random pattern of `period` tokens: a masked token is a copy of the token
    `period` places away (what masked LMs learn first)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(low, vocab, (n, period), generator=g)
    return [{"input_ids": row} for row in pattern.repeat(1, -(-length // period))[:, :length]]
