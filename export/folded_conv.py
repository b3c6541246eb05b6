"""Convolutions with more output channels than output positions, folded so that onnxruntime threads them.

MLAS (onnxruntime's CPU kernels) runs a convolution whose filter count exceeds its output positions
(128 channels on a 7×7 map: every layer of cnn-small's last blocks, resnet18's layer3 and layer4)
sample by sample, expanding each sample on one thread and calling a matrix product too small to
split: two threads run it hardly faster than one. With more positions than filters it threads over
the samples instead. So such a convolution at stride 1 is traced here as one op, ``edgebll::folded_conv2d``,
that onnxruntime runs on ``group`` samples laid side by side along the width, each followed by its
own zero columns (a window at a sample's edge reads zeros, as its own padding would give):
``N/group`` images with ``group`` times the positions. The batch is padded to a multiple of
``group`` in the graph, so any batch size runs.

The op exists only while the step is traced (below autograd, as a decomposition of
``aten.convolution``); its ONNX translation writes the fold out in standard ops (Pad, Reshape,
Transpose, Conv, Slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from onnxscript import opset18 as op

# benchmarks/results/folded_conv.md (batch 64): on 7×7 maps folded runs 0.41-0.74× the plain time at two
# threads and 0.89-1.0× at one, with 4 to 32 samples side by side alike; on 4×4 maps (a zero column per 4)
# 1.2-1.4× at one thread. Strided convolutions, which MLAS threads as they are, ran 1.04-2.8× slower folded.
_MIN_GROUP = 8
_MAX_GROUP = 32
_MAX_SEPARATOR = 1 / 6  # output columns of the zero columns per sample's output column


def span(width: int, pad: int, stride: int) -> int:
    """Columns per sample in the folded image: the sample and at least ``pad`` zeros, a multiple of the stride
    (so every sample starts where the convolution's windows start)."""
    return -(-(width + pad) // stride) * stride


def fold_group(filters: int, out_height: int, out_width: int, columns: int) -> int | None:
    """How many samples to lay side by side so that the folded image has at least as many output positions as
    filters (MLAS's threaded path), or None where the convolution is threaded as it is or the zero columns
    between samples would cost more than the threads gain. ``columns``: output columns per sample when folded
    (``out_width`` and those of its zero columns)."""
    if filters <= out_height * out_width or columns - out_width > out_width * _MAX_SEPARATOR:
        return None
    group = max(_MIN_GROUP, 2 ** math.ceil(math.log2(filters / (out_height * columns))))
    return group if group <= _MAX_GROUP else None


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output positions along one axis of a convolution (dilation 1)."""
    return (size + 2 * pad - kernel) // stride + 1


@torch.library.custom_op("edgebll::folded_conv2d", mutates_args=())
def folded_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                  group: int) -> torch.Tensor:
    """``conv2d(x, weight, stride=stride, padding=padding)``, run on ``group`` samples side by side."""
    return torch.nn.functional.conv2d(x, weight, stride=list(stride), padding=list(padding))


@folded_conv2d.register_fake
def _folded_conv2d_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                         group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0],
                        *[output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i]) for i in range(2)]))


def folded_conv2d_onnx(x: Any, weight: Any, stride: Sequence[int], padding: Sequence[int], group: int) -> Any:
    """The fold in standard ops. ``x`` is ``[N, C, H, W]``; sample ``j`` of an image takes the columns
    ``j·S`` to ``j·S + W`` and zeros up to ``(j + 1)·S`` (``S``: :func:`span`). The convolution pads the
    folded image's right end so that it has ``S / stride`` output columns per sample, the first
    ``out_width`` of them the sample's own."""
    (sh, sw), (ph, pw) = stride, padding
    channels, height, width = (int(d) for d in x.shape[1:])
    filters, kh, kw = (int(d) for d in (weight.shape[0], *weight.shape[2:]))
    out_height, out_width = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    columns = span(width, pw, sw)
    n = op.Shape(x, start=0, end=1)
    g = op.Constant(value_ints=[group])
    missing = op.Mod(op.Sub(g, op.Mod(n, g)), g)  # samples that make the batch a multiple of group
    pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0]), missing, op.Constant(value_ints=[0, 0, columns - width]),
                     axis=0)
    padded = op.Pad(x, pads)  # [N', C, H, S]
    samples = op.Reshape(padded, op.Constant(value_ints=[-1, group, channels, height, columns]))
    images = op.Reshape(op.Transpose(samples, perm=[0, 2, 3, 1, 4]),
                        op.Constant(value_ints=[-1, channels, height, group * columns]))
    # right padding kw - pw - 1: (group·S + pw + right - kw) // sw + 1 = group·S / sw output columns
    y = op.Conv(images, weight, strides=[sh, sw], pads=[ph, pw, ph, kw - pw - 1])
    per_sample = columns // sw
    y = op.Reshape(y, op.Constant(value_ints=[-1, filters, out_height, group, per_sample]))
    y = op.Reshape(op.Transpose(y, perm=[0, 3, 1, 2, 4]), op.Constant(value_ints=[-1, filters, out_height, per_sample]))
    return op.Slice(y, op.Constant(value_ints=[0, 0]), op.Concat(n, op.Constant(value_ints=[out_width]), axis=0),
                    op.Constant(value_ints=[0, 3]))


def convolution(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> Any:
    """``aten.convolution``: a stride-1 convolution folded where :func:`fold_group` says so, else left as it is
    (NotImplemented). The op and its translation take any stride (``benchmarks/folded_conv.py`` times strided ones)."""
    if (transposed or groups != 1 or input.dim() != 4 or any(v != 1 for v in dilation)
            or any(v != 1 for v in stride)):  # strided: threaded as they are (see the table above)
        return NotImplemented
    kernel = [int(weight.shape[2]), int(weight.shape[3])]
    stride, padding = [int(v) for v in stride], [int(v) for v in padding]
    # a 1×1 is one matrix product already; a padding as wide as the kernel would read past the zero columns
    if kernel == [1, 1] or padding[1] >= kernel[1]:
        return NotImplemented
    out_height, out_width = (output_size(int(input.shape[2 + i]), kernel[i], stride[i], padding[i]) for i in range(2))
    columns = span(int(input.shape[3]), padding[1], stride[1]) // stride[1]
    group = fold_group(int(weight.shape[0]), out_height, out_width, columns)
    if group is None:
        return NotImplemented
    y = folded_conv2d(input, weight, stride, padding, group)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


TRANSLATIONS = {torch.ops.edgebll.folded_conv2d.default: folded_conv2d_onnx}
