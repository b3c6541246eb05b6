"""The torch reference path: the same blocks trained block-locally in torch (host, or a GPU box).

Block k's input is block k-1's message *detached*: each block's local loss reaches only its own
parameters, exactly as in the ONNX artifacts, where the message is a graph input. Some public
block-wise code forgets the detach and silently backpropagates through every block below;
``tests/test_reference.py`` proves this path does not. Every method trains here: bp, bwbpf and
predsim with the labels as side input, and bll with its feedback chain (``feedback=``), whose
schedule is the runtime's (feedback blocks top-down first, then the forward chain with prior
m * b_k). Messages are fp32 (no codec): this path is for long runs the boards cannot do, and for
checking the runtime, which ``tests/test_reference.py`` does step by step.

On a GPU, ``fit`` keeps the whole training set on the device and gathers each batch there (the
runtime's order and cutout pixels, computed on the host, cross as indices and a mask), reads a
loss back only every ``LOSS_EVERY`` steps (each read waits for the GPU), uses fused AdamW, and
``precision="bf16"`` runs the blocks under bf16 autocast (weights, optimizer state and losses
stay fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgebll.augment import cutout_keep
from edgebll.batching import InMemoryDataset, epoch_order
from edgebll.errors import ExportError
from edgebll.train_config import mix_weight
from edgebll.schedule import learning_rate

from .artifacts import OptimizerConfig
from .local_block import BLLForwardBlock, FeedbackBlock

EpochEnd = Callable[[int, "TorchReference"], None]
PRECISIONS = ("fp32", "bf16")
LOSS_EVERY = 50
"""fit reads the losses (for the progress bar) once per this many steps: every read is a GPU sync."""


class TorchReference:
    """K torch blocks (from ``build_blocks``), one optimizer each, trained on their local losses.

    For bll, ``feedback`` holds the K-1 feedback blocks (``plan_blocks``' "feedback" plans, in
    block order); they learn at ``feedback_lr_scale`` times the rate, as in the runtime.
    ``precision`` is "fp32" (the runtime's numbers) or "bf16" (autocast, for speed on a GPU).
    """

    def __init__(self, blocks: Sequence[nn.Module], optimizer: OptimizerConfig | None = None,
                 device: str | torch.device = "cpu", *, feedback: Sequence[nn.Module] = (),
                 feedback_lr_scale: float = 10.0, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ExportError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        self.is_bll = any(isinstance(b, BLLForwardBlock) for b in blocks)
        if self.is_bll and (len(feedback) != len(blocks) - 1 or not all(isinstance(f, FeedbackBlock) for f in feedback)):
            raise ExportError(f"bll needs one feedback block per forward block but the last: {len(blocks) - 1}, got "
                              f"{len(feedback)}; hint: take them from plan_blocks(spec, 'bll', K)")
        if feedback and not self.is_bll:
            raise ExportError("feedback blocks belong to --method bll; these forward blocks are not BLL blocks")
        config = optimizer or OptimizerConfig()
        self.device = torch.device(device)
        self.blocks = [b.to(self.device) for b in blocks]
        self.feedback = [f.to(self.device) for f in feedback]
        self.feedback_lr_scale = feedback_lr_scale
        self.precision = precision
        self.num_classes = self.feedback[0].net[-1].out_features if self.feedback else None

        fused = self.device.type == "cuda"  # one kernel per step instead of one per tensor

        def make(module: nn.Module) -> torch.optim.Optimizer:
            if config.name == "sgd":
                return torch.optim.SGD(module.parameters(), lr=0.0)
            return torch.optim.AdamW(module.parameters(), lr=0.0, betas=config.betas, eps=config.eps,
                                     weight_decay=config.weight_decay, fused=fused)

        self.optimizers = [make(b) for b in self.blocks]
        self.feedback_optimizers = [make(f) for f in self.feedback]

    def local_losses(self, x: torch.Tensor, labels: torch.Tensor,
                     priors: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, logits) of every block; block k+1 reads block k's message detached (no gradient crosses).

        A BLL forward block takes ``priors[k]`` (m * b_k) as its side input, zero when None (its
        prediction does not depend on it: evaluation needs no feedback chain).
        """
        results, h = [], x
        for k, block in enumerate(self.blocks):
            if isinstance(block, BLLForwardBlock):
                side = priors[k] if priors is not None else torch.zeros((*labels.shape, int(self.num_classes)),
                                                                          device=h.device)
            else:
                side = labels
            with self._autocast():
                out = block(h, side)
            results.append((out[0], out[1]))
            if k < len(self.blocks) - 1:
                h = out[2].detach()
        return results

    def feedback_step(self, labels: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """BLL's backward pass: one step of every feedback block, top-down; returns b_k (detached) per block k < K-1.

        beta above the top feedback block is the one-hot target; each block reads the one above's
        probabilities detached, as its graph input in the runtime.
        """
        target = nn.functional.one_hot(labels, int(self.num_classes)).float()
        beta, priors = target, [torch.empty(0)] * len(self.feedback)
        for k in range(len(self.feedback) - 1, -1, -1):
            with self._autocast():
                loss, b, beta_out = self.feedback[k](beta, target)
            self._step(self.feedback_optimizers[k], loss, lr * self.feedback_lr_scale)
            priors[k], beta = b.detach(), beta_out.detach()
        return priors

    def train_step(self, x: torch.Tensor, labels: torch.Tensor, lr: float, mix: float = 1.0) -> list[float]:
        """One local step of every block at learning rate ``lr``; returns the forward blocks' local losses.

        ``mix`` (bll) is the weight m of the feedback natural parameters in each posterior.
        """
        return [loss.item() for loss in self._train_step(x.to(self.device), labels.to(self.device), lr, mix)]

    def _train_step(self, x: torch.Tensor, labels: torch.Tensor, lr: float, mix: float) -> list[torch.Tensor]:
        """train_step on tensors already on the device; the losses stay there (no GPU sync)."""
        for module in (*self.blocks, *self.feedback):
            module.train()
        priors = [mix * b for b in self.feedback_step(labels, lr)] if self.is_bll else None
        losses = [loss for loss, _ in self.local_losses(x, labels, priors)]
        for optimizer, loss in zip(self.optimizers, losses):
            self._step(optimizer, loss, lr)
        return [loss.detach() for loss in losses]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Correct labels (per sample, or per token) of every block's head on one batch, in eval mode."""
        for block in self.blocks:
            block.eval()
        labels = labels.to(self.device)
        return [int((logits.argmax(-1) == labels).sum()) for _, logits in self.local_losses(x.to(self.device), labels)]

    def evaluate(self, data: InMemoryDataset, batch_size: int = 500) -> list[float]:
        """Accuracy of every block's head on ``data`` (per label), the forward chain alone."""
        correct, labelled = np.zeros(len(self.blocks)), 0
        for x, labels in data.batches(batch_size):
            correct += self.accuracy(torch.from_numpy(x), torch.from_numpy(labels))
            labelled += labels.size
        return (correct / max(labelled, 1)).round(5).tolist()

    def fit(self, data: InMemoryDataset, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
            schedule: str = "cosine", cutout_size: int = 0, mix: tuple[float, float] = (2.0, 0.5),
            on_epoch_end: EpochEnd | None = None, progress: bool = True) -> int:
        """Train for ``epochs`` as ``edgebll train`` does: the same batches (order from seed and epoch, full
        batches only), learning-rate schedule, cutout pixels and BLL mixing schedule (``mix``: m at the
        first and last step, linear between). ``on_epoch_end(epoch, self)`` runs after each epoch (a curve).
        Returns the steps trained.
        """
        steps = data.num_batches(batch_size, drop_last=True)
        if steps == 0:
            raise ExportError(f"{len(data)} training samples make no full batch of {batch_size}")
        total, step = steps * epochs, 0
        # the whole set on the device once (on the CPU: the arrays themselves, no copy)
        inputs, labels = (torch.as_tensor(a, device=self.device) for a in data.arrays())
        bar = tqdm(total=total, desc="train (torch)", unit="step", disable=not progress)
        for epoch in range(epochs):
            order = torch.as_tensor(epoch_order(len(data), seed, epoch), device=self.device)
            for start in range(0, steps * batch_size, batch_size):
                picked = order[start:start + batch_size]  # data.batches' order and batches, full ones only
                x = inputs[picked]
                if cutout_size:
                    keep = cutout_keep(batch_size, x.shape[-2], x.shape[-1], cutout_size, seed=seed, step=step)
                    x = x * torch.as_tensor(keep, device=self.device)[:, None]
                m = mix_weight(*mix, step, total)
                losses = self._train_step(x, labels[picked], learning_rate(schedule, lr, step, total), m)
                step += 1
                bar.update()
                if step % LOSS_EVERY == 0 or step == total:
                    bar.set_postfix(loss=f"{losses[-1].item():.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, self)
        bar.close()
        return step
