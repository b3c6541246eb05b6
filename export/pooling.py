"""Average pooling that ORT 1.19.2 can train: a MatMul with a fixed pooling matrix, or a tiled mean.

ORT's gradient of ONNX ``AveragePool`` is broken here: a block whose loss reads an
``nn.AvgPool2d`` of its activation dies with SIGFPE in the backward pass, or (when the activation
has a second consumer) fails in the gradient Sum with a zero-sized tensor. A pool is a linear map,
so ``x.flatten(2) @ P`` with a constant [H*W, H'*W'] matrix ``P`` computes exactly the same
numbers through ops (MatMul, Reshape) whose gradients ORT has. ``P`` is built by running
torch's own ``AvgPool2d`` on the identity, so the semantics (padding, zeros counted in the
average) are torch's by construction. It is a non-persistent buffer: a graph constant, not a
checkpoint entry.
"""

from __future__ import annotations

import torch
from torch import nn


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pooling_for(shape: tuple[int, ...], max_features: int) -> tuple[int, int]:
    """(kernel, padding) of the square average pool that brings ``shape`` (C, H, W) to <= ``max_features``.

    Doubles the kernel (stride = kernel) until C * ceil(H/k) * ceil(W/k) fits or the kernel covers
    the map; the padding makes the output exactly ceil(side/k) on the larger side, as the Pred-Sim
    paper's code does. (1, 0): no pooling needed.
    """
    channels, height, width = shape
    kernel, side = 1, max(height, width)
    while channels * _ceil_div(height, kernel) * _ceil_div(width, kernel) > max_features and kernel < side:
        kernel *= 2
    padding = (kernel * (_ceil_div(side, kernel) - side // kernel)) // 2
    return kernel, padding


class MatrixAveragePool(nn.Module):
    """``nn.AvgPool2d(kernel, kernel, padding)`` of a fixed (C, H, W) input, as a MatMul (see module doc)."""

    def __init__(self, shape: tuple[int, ...], kernel: int, padding: int = 0) -> None:
        super().__init__()
        _, height, width = shape
        eye = torch.eye(height * width).reshape(height * width, 1, height, width)
        pooled = nn.functional.avg_pool2d(eye, kernel, stride=kernel, padding=padding)
        self.channels, self.in_hw, self.out_hw = shape[0], (height, width), tuple(pooled.shape[2:])
        self.register_buffer("matrix", pooled.flatten(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # constant target shapes (batch as -1) keep ONNX shape inference, and so the memory estimate, exact
        flat = x.reshape(-1, self.channels, self.in_hw[0] * self.in_hw[1])
        return (flat @ self.matrix).reshape(-1, self.channels, *self.out_hw)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return (shape[0], *self.out_hw)


class BlockMeanPool(nn.Module):
    """Mean over non-overlapping ``kernel`` x ``kernel`` tiles of a (C, H, W) map whose sides ``kernel`` divides.

    Reshape + ReduceMean: trains in ORT (unlike AveragePool), and costs one add per input value
    where the pooling matrix costs H'*W' (what a head in front of a cheap block can afford).
    """

    def __init__(self, shape: tuple[int, ...], kernel: int) -> None:
        super().__init__()
        _, height, width = shape
        if height % kernel or width % kernel:
            raise ValueError(f"BlockMeanPool: kernel {kernel} does not divide the map {height}x{width}")
        self.channels, self.kernel, self.out_hw = shape[0], kernel, (height // kernel, width // kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, (h, w) = self.kernel, self.out_hw
        # constant target shape (batch as -1): ONNX shape inference, and so the memory estimate, stays exact
        return x.reshape(-1, self.channels, h, k, w, k).mean(dim=(3, 5))

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return (shape[0], *self.out_hw)
