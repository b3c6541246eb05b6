"""BWBPF local heads: the small classifier each block trains its features with.

"linear": global average pool + linear (the classic auxiliary head). "conv": one stride-2 3x3
conv + BatchNorm + ReLU before the pool; the block-wise papers found such a head necessary to
keep early blocks (wide, high-resolution, weakly discriminative features) useful.

A sequence model (one label per token, activations ``[T, d_model]``) gets a :class:`TokenHead`
whatever the kind: there is nothing to pool, each token is read out on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from edgebll.errors import ExportError

HEADS = ("linear", "conv")


class LinearHead(nn.Module):
    """Global average pool over every axis after the channel axis, then a linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.mean(dim=tuple(range(2, x.dim())))
        return self.fc(x)


class ConvHead(nn.Module):
    """Stride-2 conv (width capped so the head never outweighs small blocks), pool, linear."""

    def __init__(self, channels: int, num_classes: int, max_width: int = 128) -> None:
        super().__init__()
        width = min(channels * 2, max_width)
        self.conv = nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pool_fc = LinearHead(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_fc(torch.relu(self.bn(self.conv(x))))


class TokenHead(nn.Module):
    """Per-token read-out ``[B, T, d] -> [B, T, classes]``: LayerNorm, then a linear layer.

    The LayerNorm is the one a pre-norm transformer puts before its output layer (GPT's ``ln_f``):
    the residual stream a block sends on is not normalised, and its scale grows with depth.
    """

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def make_head(kind: str, activation_shape: tuple[int, ...], num_classes: int, *, per_token: bool = False) -> nn.Module:
    """A head for a block whose per-sample output has ``activation_shape``: (C, H, W) or (C,), or
    with ``per_token`` (T, d) read out token by token."""
    if kind not in HEADS:
        raise ExportError(f"unknown head {kind!r}; choose one of {list(HEADS)}")
    if per_token:
        return TokenHead(activation_shape[-1], num_classes)
    channels = activation_shape[0]
    # A conv head needs a spatial (C, H, W) activation; a vector activation (an MLP block) gets the linear head.
    if kind == "conv" and len(activation_shape) == 3:
        return ConvHead(channels, num_classes)
    return LinearHead(channels, num_classes)
