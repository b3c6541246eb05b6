"""The torch module that becomes one block's training graph: body + local head + local loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written as log-softmax + gather.

    torch's ``F.cross_entropy`` exports as SoftmaxCrossEntropyLoss without the optional log-prob
    output that ORT's gradient builder reads; this form exports to ops that all train as-is.
    """
    return -torch.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).mean()


class LocalBlock(nn.Module):
    """``forward(x, labels) -> (loss, logits[, y])``.

    ``x`` enters as a graph input, so no gradient can leave the block: the block-local property
    holds by construction in ONNX, which has no stop-gradient. ``y`` (the activation for the next
    block) is returned by every block but the last.
    """

    def __init__(self, units: Sequence[nn.Module], head: nn.Module, *, emits_message: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*units)
        self.head = head
        self.emits_message = emits_message

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.body(x)
        logits = self.head(y)
        loss = cross_entropy(logits, labels)
        return (loss, logits, y) if self.emits_message else (loss, logits)
