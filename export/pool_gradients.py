"""Average pooling's backward ops in forward ops, for the portable training graph.

torch has no decomposition of ``avg_pool2d_backward`` or ``_adaptive_avg_pool2d_backward``, and
the ONNX exporter no translation, so a block with ``AvgPool1d/2d`` or a non-global
``AdaptiveAvgPool1d/2d`` could not be exported portable. Both poolings are separable: output
``(i, j)`` averages the input rows of window ``i`` times the columns of window ``j`` (divided by
a count that is a product of a row and a column factor, or a fixed divisor), so the input
gradient is ``A_hᵀ · (grad / D) · A_w`` with 0/1 window-membership matrices ``A_h [Ho, H]`` and
``A_w [Wo, W]`` built from the static spatial sizes: two matrix products per channel.
(1-D pooling reaches here as 2-D pooling of an unsqueezed input.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _windows_1d(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool,
                count_include_pad: bool) -> tuple[list[list[float]], list[float]]:
    """(membership [out][size], divisor per output) of one axis of avg_pool (torch's window rules)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding: torch drops it
    rows, divisors = [], []
    for o in range(out):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        padded_count = end - start
        lo, hi = max(start, 0), min(end, size)
        rows.append([1.0 if lo <= i < hi else 0.0 for i in range(size)])
        divisors.append(float(padded_count if count_include_pad else hi - lo))
    return rows, divisors


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = list(value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def avg_pool2d_backward(grad_output: torch.Tensor, self: torch.Tensor, kernel_size: Sequence[int],
                        stride: Sequence[int], padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                        divisor_override: int | None) -> torch.Tensor:
    """The gradient of ``avg_pool2d(self, ...)`` with respect to ``self``."""
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    sh, sw = _pair(stride) if stride else (kh, kw)
    height, width = int(self.shape[-2]), int(self.shape[-1])
    a_h, d_h = _windows_1d(height, kh, sh, ph, ceil_mode, count_include_pad)
    a_w, d_w = _windows_1d(width, kw, sw, pw, ceil_mode, count_include_pad)
    if divisor_override:
        divisor = torch.full((len(d_h), len(d_w)), float(divisor_override), dtype=grad_output.dtype)
    else:
        divisor = torch.tensor(d_h, dtype=grad_output.dtype)[:, None] * torch.tensor(d_w, dtype=grad_output.dtype)[None]
    return _spread(grad_output / divisor, a_h, a_w)


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, self: torch.Tensor) -> torch.Tensor:
    """The gradient of ``adaptive_avg_pool2d(self, grad_output's spatial size)`` with respect to ``self``."""
    a_h, d_h = _adaptive_1d(int(self.shape[-2]), int(grad_output.shape[-2]))
    a_w, d_w = _adaptive_1d(int(self.shape[-1]), int(grad_output.shape[-1]))
    divisor = torch.tensor(d_h, dtype=grad_output.dtype)[:, None] * torch.tensor(d_w, dtype=grad_output.dtype)[None]
    return _spread(grad_output / divisor, a_h, a_w)


def _adaptive_1d(size: int, out: int) -> tuple[list[list[float]], list[float]]:
    """torch's adaptive windows: output ``o`` averages ``[floor(o·size/out), ceil((o+1)·size/out))``."""
    rows, divisors = [], []
    for o in range(out):
        lo, hi = (o * size) // out, math.ceil((o + 1) * size / out)
        rows.append([1.0 if lo <= i < hi else 0.0 for i in range(size)])
        divisors.append(float(hi - lo))
    return rows, divisors


def _spread(scaled: torch.Tensor, a_h: list[list[float]], a_w: list[list[float]]) -> torch.Tensor:
    """``A_hᵀ · scaled · A_w`` over the last two axes: each output's share back onto the inputs it averaged."""
    rows = torch.tensor(a_h, dtype=scaled.dtype).t()  # [H, Ho]
    columns = torch.tensor(a_w, dtype=scaled.dtype)  # [Wo, W]
    return torch.matmul(torch.matmul(rows, scaled), columns)
