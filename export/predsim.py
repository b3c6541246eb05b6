"""Pred-Sim local losses (Nøkland & Eidnes, "Training neural networks with local error signals", ICML 2019).

Every block but the last trains on ``(1 - beta) * pred + beta * sim`` (beta = 0.99 by default):

- *prediction*: average-pool the block's activation until it has at most ``max_features``
  features, flatten, one zero-initialised linear layer, cross-entropy;
- *similarity*: a 3x3 conv of the activation (conv activations only), the per-channel standard
  deviation over space, the B x B adjusted cosine-similarity matrix of the batch, mean squared
  error against the B x B similarity matrix of the one-hot labels.

The last block's head is the classifier, trained with plain cross-entropy (as in the paper).

ONNX has no stop-gradient (docs/design.md), so the label-similarity matrix, a target, is computed
from the ``labels`` input alone (Equal + Cast + affine map): no parameter lies on its path, and
ORT's gradient graph cannot flow into it. ``tests/test_predsim.py`` checks the exported graph for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgebll.errors import ExportError

from .local_block import cross_entropy
from .pooling import MatrixAveragePool, pooling_for


@dataclass(kw_only=True, slots=True)
class PredSimConfig:
    """The two local terms of a Pred-Sim block and how they mix."""

    beta: float = 0.99
    """Weight of the similarity term; the prediction term gets 1 - beta (the paper's 0.99)."""
    max_features: int = 2048
    """The prediction term average-pools the activation until C * H * W <= this (the paper's 2048)."""

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ExportError(f"--predsim-beta must be in [0, 1] (weight of the similarity term), got {self.beta}")
        if self.max_features < 1:
            raise ExportError(f"predsim max_features must be at least 1, got {self.max_features}")


# sqrt has an infinite derivative at 0: a channel that is constant over space (a dead ReLU map)
# would turn the whole step into NaN. 1e-8 under the root changes a unit-scale std by ~1e-8.
STD_EPS = 1e-8
# The paper's guard against dividing by a zero norm (a sample whose features are all equal).
NORM_EPS = 1e-8


class PredictionHead(nn.Module):
    """Average pool to <= ``max_features``, flatten, one linear layer initialised at zero (as in the paper)."""

    def __init__(self, activation_shape: tuple[int, ...], num_classes: int, max_features: int = 2048) -> None:
        super().__init__()
        self.pool: nn.Module = nn.Identity()
        if len(activation_shape) == 3:
            kernel, padding = pooling_for(activation_shape, max_features)
            if kernel > 1:
                self.pool = MatrixAveragePool(activation_shape, kernel, padding)
        with torch.no_grad():
            features = self.pool(torch.zeros(1, *activation_shape)).numel()
        self.fc = nn.Linear(features, num_classes)
        # Zero start: the prediction term's first gradients into the block are zero, the
        # similarity term shapes the features first (the paper's initialisation of the decoder).
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(y).flatten(1))


def spatial_std(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]: unbiased standard deviation of each channel over space.

    Written out (mean, squared deviation, sum, sqrt) so that ORT differentiates every op.
    """
    n = z.shape[2] * z.shape[3]
    flat = z.reshape(-1, z.shape[1], n)  # constant target shape: ONNX shape inference stays exact
    centred = flat - flat.mean(dim=2, keepdim=True)
    return torch.sqrt((centred * centred).sum(dim=2) / (n - 1) + STD_EPS)


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """[B, F] -> [B, B]: adjusted cosine similarity (each row centred, then unit length), the paper's form.

    The paper clamps the result to [-1, 1]; Cauchy-Schwarz already bounds it there up to rounding,
    and leaving the clamp out keeps a Clip gradient out of the training graph.
    """
    centred = features - features.mean(dim=1, keepdim=True)
    unit = centred / (NORM_EPS + torch.sqrt((centred * centred).sum(dim=1, keepdim=True)))
    return unit @ unit.t()


def label_similarity(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] int64 -> [B, B]: ``similarity_matrix`` of the one-hot labels, computed without one-hot.

    A centred one-hot vector of C classes has unit-length form with entries (1 - 1/C) and -1/C; two
    of them have cosine 1 for the same class and -1/(C - 1) otherwise. Equal + Cast + an affine
    map: no parameter on the path, so the target stays a target in ONNX.
    """
    same = (labels.unsqueeze(1) == labels.unsqueeze(0)).to(torch.float32)
    off = 1.0 / (num_classes - 1)
    return same * (1.0 + off) - off


class SimilarityHead(nn.Module):
    """Activation -> the B x B similarity matrix of the batch (3x3 conv + spatial std for conv maps)."""

    def __init__(self, activation_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv: nn.Module | None = None
        self.use_std = False
        if len(activation_shape) == 3:
            channels, height, width = activation_shape
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            # as in the paper: a per-channel std needs more than one pixel and a few channels; else flatten
            self.use_std = channels > 3 and height * width > 1

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = self.conv(y) if self.conv is not None else y
        features = spatial_std(z) if self.use_std else z.flatten(1)
        return similarity_matrix(features)


class PredSimBlock(nn.Module):
    """Pred-Sim block k < K-1: ``forward(x, labels) -> (loss, logits, y, sim)``.

    ``logits`` come from the prediction head (they give the block's accuracy); ``y`` is the
    message up; ``sim`` is the similarity term alone (a metric, reported). ``x`` is a graph input:
    no gradient leaves the block.
    """

    def __init__(self, units: Sequence[nn.Module], activation_shape: tuple[int, ...], num_classes: int,
                 config: PredSimConfig | None = None) -> None:
        super().__init__()
        config = config or PredSimConfig()
        config.validate()
        if num_classes < 2:
            raise ExportError(f"predsim needs at least 2 classes for its label similarity, got {num_classes}")
        self.body = nn.Sequential(*units)
        self.head = PredictionHead(activation_shape, num_classes, config.max_features)
        self.similarity = SimilarityHead(activation_shape)
        self.beta = config.beta
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.body(x)
        logits = self.head(y)
        difference = self.similarity(y) - label_similarity(labels, self.num_classes)
        sim = (difference * difference).mean()
        loss = (1.0 - self.beta) * cross_entropy(logits, labels) + self.beta * sim
        return loss, logits, y, sim
