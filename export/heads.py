"""BWBPF local heads: the small classifier each block trains its features with.

"linear": global average pool + linear (the classic auxiliary head). "conv": one stride-2 3x3
conv + BatchNorm + ReLU before the pool; the block-wise papers found such a head necessary to
keep early blocks (wide, high-resolution, weakly discriminative features) useful. "mlp": the
same stride-2 conv, global pool, a 128-unit hidden layer, then the classifier; published
comparisons show pool + linear falling far behind as K grows.

Heads never outweigh their block: ``make_head(..., max_macs=block_macs)`` average-pools the
head's input (tiles whose side divides the map: 2, then the next divisor, ...) until the head's
multiply-accumulates per sample are at most the block's own. That leaves cnn-small (any K) and
resnet18 (K <= 8) untouched; it bites where a block is one cheap layer (vgg8b's first conv from
K = 5: 0.9 M MACs, whose unpooled conv head would cost 29 M).

A sequence model (one label per token, activations ``[T, d_model]``) gets a :class:`TokenHead`
whatever the kind: there is nothing to pool, each token is read out on its own (and the cap does
not apply: the head is a LayerNorm and one linear layer per token).
"""

from __future__ import annotations

import torch
from torch import nn

from edgebll.errors import ExportError

from .partition import unit_costs
from .pooling import BlockMeanPool

HEADS = ("linear", "conv", "mlp")


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


class MLPHead(nn.Module):
    """Stride-2 conv (width capped as in ConvHead), global pool, a ``hidden``-unit ReLU layer, classifier."""

    def __init__(self, channels: int, num_classes: int, max_width: int = 128, hidden: int = 128) -> None:
        super().__init__()
        width = min(channels * 2, max_width)
        self.conv = nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.hidden = nn.Linear(width, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(torch.relu(self.hidden(pooled)))


class PooledHead(nn.Module):
    """``head(pool(x))``: a head behind an average pool that shrinks its input (see ``make_head``)."""

    def __init__(self, pool: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))


def _build_head(kind: str, channels: int, num_classes: int, spatial: bool) -> nn.Module:
    # A conv (or mlp) head needs a spatial (C, H, W) activation; a vector activation (an MLP block) gets the linear head.
    if kind == "conv" and spatial:
        return ConvHead(channels, num_classes)
    if kind == "mlp" and spatial:
        return MLPHead(channels, num_classes)
    return LinearHead(channels, num_classes)


def head_macs(head: nn.Module, activation_shape: tuple[int, ...]) -> float:
    """Multiply-accumulates of ``head`` per sample on an ``activation_shape`` input (convs and linears)."""
    return unit_costs([head], activation_shape)[0][0]


def make_head(kind: str, activation_shape: tuple[int, ...], num_classes: int, max_macs: float | None = None, *,
              per_token: bool = False) -> nn.Module:
    """A head for a block whose per-sample output has ``activation_shape``: (C, H, W) or (C,), or
    with ``per_token`` (T, d) read out token by token (a :class:`TokenHead`, never pooled).

    With ``max_macs`` (the block's own multiply-accumulates per sample) a head that would cost more
    gets its input average-pooled in tiles (the smallest tile side dividing H and W that brings it
    within budget; the whole map at worst): the head never outweighs the block it trains.
    """
    if kind not in HEADS:
        raise ExportError(f"unknown head {kind!r}; choose one of {list(HEADS)}")
    if per_token:
        return TokenHead(activation_shape[-1], num_classes)
    channels, spatial = activation_shape[0], len(activation_shape) == 3
    head = _build_head(kind, channels, num_classes, spatial)
    if max_macs is None or not spatial or head_macs(head, activation_shape) <= max_macs:
        return head
    _, height, width = activation_shape
    tiles = [k for k in range(2, min(height, width) + 1) if height % k == 0 and width % k == 0]
    for k in tiles:
        pool = BlockMeanPool(activation_shape, k)
        pooled = pool.output_shape(activation_shape)
        candidate = _build_head(kind, channels, num_classes, spatial)
        # the pool's own adds count too: one per input value
        if head_macs(candidate, pooled) + channels * height * width <= max_macs or k == tiles[-1]:
            return PooledHead(pool, candidate)
    return head  # no tile divides the map (a prime side): nothing to pool with; keep the head as it is
