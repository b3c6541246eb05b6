"""The torch reference path: the same blocks trained block-locally in torch (host, or a GPU box).

Block k's input is block k-1's message *detached*: each block's local loss reaches only its own
parameters, exactly as in the ONNX artifacts, where the message is a graph input. Some public
block-wise code forgets the detach and silently backpropagates through every block below;
``tests/test_reference.py`` proves this path does not. Methods whose side input is the labels
(bp, bwbpf, predsim) train here; BLL needs its feedback chain and trains through the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgebll.errors import ExportError

from .artifacts import OptimizerConfig
from .local_block import BLLForwardBlock


class TorchReference:
    """K torch blocks (from ``build_blocks``), one optimizer each, trained on their local losses."""

    def __init__(self, blocks: Sequence[nn.Module], optimizer: OptimizerConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        if any(isinstance(b, BLLForwardBlock) for b in blocks):
            raise ExportError("the torch reference path trains bp, bwbpf and predsim; bll trains through the runtime")
        config = optimizer or OptimizerConfig()
        self.blocks = [b.to(device) for b in blocks]
        self.device = torch.device(device)
        self.optimizers = [
            torch.optim.SGD(b.parameters(), lr=0.0) if config.name == "sgd"
            else torch.optim.AdamW(b.parameters(), lr=0.0, betas=config.betas, eps=config.eps,
                                   weight_decay=config.weight_decay)
            for b in self.blocks
        ]

    def local_losses(self, x: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, logits) of every block; block k+1 reads block k's message detached (no gradient crosses)."""
        results, h = [], x
        for k, block in enumerate(self.blocks):
            out = block(h, labels)
            results.append((out[0], out[1]))
            if k < len(self.blocks) - 1:
                h = out[2].detach()
        return results

    def train_step(self, x: torch.Tensor, labels: torch.Tensor, lr: float) -> list[float]:
        """One local step of every block at learning rate ``lr``; returns the local losses."""
        for block in self.blocks:
            block.train()
        losses = [loss for loss, _ in self.local_losses(x.to(self.device), labels.to(self.device))]
        for optimizer, loss in zip(self.optimizers, losses):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return [loss.item() for loss in losses]

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Correct predictions of every block's head on one batch, in eval mode."""
        for block in self.blocks:
            block.eval()
        labels = labels.to(self.device)
        return [int((logits.argmax(1) == labels).sum()) for _, logits in self.local_losses(x.to(self.device), labels)]
