"""A small pre-norm transformer encoder as units: embedding first, then one unit per layer.

The BLL paper's sequence model is a 20-layer transformer with one attention head. Each layer is
a unit, so ``--blocks K`` puts 20/K layers in a block (the embedding joins the first block).
Everything here is built from ops that ONNX Runtime 1.19 differentiates and that match torch
(see docs/design.md): attention is written out as matmul + softmax, the MLP uses ReLU (GELU-tanh has a
wrong gradient at opset 20), LayerNorm gets its optional outputs named at export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True, slots=True)
class TransformerConfig:
    """Size of the sequence model (defaults: the paper's depth, a width a board trains quickly)."""

    length: int = 10
    """Tokens per sequence; also the vocabulary (the task permutes 0..length-1)."""
    layers: int = 20
    """Transformer layers, one unit each."""
    d_model: int = 64
    """Width of the residual stream (the message between blocks is [B, length, d_model])."""
    d_ff: int = 128
    """Hidden width of each layer's MLP."""


class TokenEmbedding(nn.Module):
    """Token ids ``[B, T]`` (int64) -> ``[B, T, d]``: a token embedding plus a learned position embedding."""

    def __init__(self, vocab: int, length: int, d_model: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        # the same scale as the token embedding (N(0, 1)): at GPT-2's 0.02 the positions drown in the
        # tokens after LayerNorm and the model never learns where to attend (measured: chance after 3 epochs)
        self.position = nn.Parameter(torch.randn(length, d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token(tokens) + self.position


class SelfAttention(nn.Module):
    """One-head self-attention over all positions (no mask: the task needs to see the whole sequence)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        # No key bias: it adds q·b to every score of a row, which softmax ignores, so its gradient is
        # zero up to rounding, and Adam would scale that rounding noise up to full-size steps (seen:
        # ORT and torch moved it by different ±lr, the only parameter that broke parity).
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out(weights @ v)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attention(norm(x)), then + MLP(norm(x)).

    Pre-norm keeps every layer's residual stream an unnormalised sum, so a block boundary can fall
    between any two layers and the next block starts from exactly what backprop's next layer sees.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def transformer_units(config: TransformerConfig) -> list[nn.Module]:
    """``[TokenEmbedding, TransformerLayer × config.layers]``."""
    return [TokenEmbedding(config.length, config.length, config.d_model)] + [
        TransformerLayer(config.d_model, config.d_ff) for _ in range(config.layers)
    ]
