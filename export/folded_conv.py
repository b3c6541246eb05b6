"""Convolutions with more output channels than output positions, folded so that onnxruntime threads them.

MLAS (onnxruntime's CPU kernels) runs a convolution whose filter count exceeds its output positions
(128 channels on a 7×7 map: every layer of cnn-small's last blocks, resnet18's layer3 and layer4)
sample by sample, expanding each sample on one thread and calling a matrix product too small to
split: two threads run it hardly faster than one. With more positions than filters it threads over
the samples instead. So a "same" stride-1 convolution on such a map is traced here as one op,
``edgebll::folded_conv2d``, that onnxruntime runs on ``group`` samples laid side by side along the
width, each followed by its own zero columns (a window at a sample's edge reads zeros, as its own
padding would give): ``N/group`` images with ``group`` times the positions. The batch is padded to a
multiple of ``group`` in the graph, so any batch size runs.

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

aten = torch.ops.aten

# benchmarks/results/folded_conv.md (batch 64): on 7×7 maps folded runs 0.44-0.69× the plain time at two
# threads and 0.92-1.0× at one, with 4 to 32 samples side by side alike; on 4×4 maps (a zero column per 4)
# 1.03-1.41× at either
_MIN_GROUP = 8
_MAX_GROUP = 32
_MAX_SEPARATOR = 1 / 6  # zero columns per sample column


def fold_group(filters: int, height: int, width: int, pad: int) -> int | None:
    """How many samples to lay side by side so that the folded image has at least as many positions as
    filters (MLAS's threaded path), or None where the convolution is threaded as it is or the zero
    columns between samples would cost more than the threads gain."""
    if filters <= height * width or pad > width * _MAX_SEPARATOR:
        return None
    group = max(_MIN_GROUP, 2 ** math.ceil(math.log2(filters / (height * (width + pad)))))
    return group if group <= _MAX_GROUP else None


@torch.library.custom_op("edgebll::folded_conv2d", mutates_args=())
def folded_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: Sequence[int], group: int) -> torch.Tensor:
    """``conv2d(x, weight, padding=padding)``, stride 1, "same" size (``kernel = 2·padding + 1``)."""
    return torch.nn.functional.conv2d(x, weight, padding=list(padding))


@folded_conv2d.register_fake
def _folded_conv2d_shape(x: torch.Tensor, weight: torch.Tensor, padding: Sequence[int], group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def folded_conv2d_onnx(x: Any, weight: Any, padding: Sequence[int], group: int) -> Any:
    """The fold in standard ops. ``x`` is ``[N, C, H, W]``; sample ``j`` of an image takes the columns
    ``j·(W + pw)`` to ``j·(W + pw) + W``, then ``pw`` zero columns."""
    ph, pw = padding
    channels, height, width = (int(d) for d in x.shape[1:])
    filters = int(weight.shape[0])
    span = width + pw
    n = op.Shape(x, start=0, end=1)
    g = op.Constant(value_ints=[group])
    missing = op.Mod(op.Sub(g, op.Mod(n, g)), g)  # samples that make the batch a multiple of group
    zeros = op.Constant(value_ints=[0, 0, 0, 0])
    pads = op.Concat(zeros, missing, op.Constant(value_ints=[0, 0, pw]), axis=0)
    padded = op.Pad(x, pads)  # [N', C, H, W + pw]
    samples = op.Reshape(padded, op.Constant(value_ints=[-1, group, channels, height, span]))
    images = op.Reshape(op.Transpose(samples, perm=[0, 2, 3, 1, 4]),
                        op.Constant(value_ints=[-1, channels, height, group * span]))
    y = op.Conv(images, weight, pads=[ph, pw, ph, pw])  # [N'/group, filters, H, group·(W + pw)]
    y = op.Reshape(y, op.Constant(value_ints=[-1, filters, height, group, span]))
    y = op.Reshape(op.Transpose(y, perm=[0, 3, 1, 2, 4]), op.Constant(value_ints=[-1, filters, height, span]))
    return op.Slice(y, op.Constant(value_ints=[0, 0]), op.Concat(n, op.Constant(value_ints=[width]), axis=0),
                    op.Constant(value_ints=[0, 3]))


def convolution(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> Any:
    """``aten.convolution``: folded where :func:`fold_group` says so, else left as it is (NotImplemented)."""
    if (transposed or groups != 1 or input.dim() != 4 or any(v != 1 for v in stride) or any(v != 1 for v in dilation)
            or any(weight.shape[2 + i] != 2 * padding[i] + 1 for i in range(2)) or weight.shape[2] == 1):
        return NotImplemented
    height, width = int(input.shape[2]), int(input.shape[3])
    group = fold_group(int(weight.shape[0]), height, width, int(padding[1]))
    if group is None:
        return NotImplemented
    y = folded_conv2d(input, weight, [int(p) for p in padding], group)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


TRANSLATIONS = {torch.ops.edgebll.folded_conv2d.default: folded_conv2d_onnx}
