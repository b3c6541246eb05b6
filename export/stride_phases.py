"""A strided convolution's input split into its stride phases, as ONNX's SpaceToDepth does it.

The weight gradient of a stride-``s`` convolution reads, for each kernel offset, every ``s``-th row and
column of the padded input from some phase ``(i, j)`` on. Laying the ``s × s`` phases out as channel
blocks turns each offset's window into a contiguous run of one block (:func:`.portable._weight_gradient_by_offsets`).
torch's ``pixel_unshuffle`` orders the channels the other way round (channel-major) and decomposes into a
6-D Transpose, which onnxruntime runs 4-6× slower than its SpaceToDepth kernel; so the step is traced as
one op, ``edgebll::space_to_depth``, translated to SpaceToDepth.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op


@torch.library.custom_op("edgebll::space_to_depth", mutates_args=())
def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, block²·C, H/block, W/block]``, channel ``(i·block + j)·C + c`` holding
    ``x[:, c, i::block, j::block]`` (ONNX SpaceToDepth's order)."""
    n, c, h, w = x.shape
    phases = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return phases.reshape(n, block * block * c, h // block, w // block).clone()


@space_to_depth.register_fake
def _space_to_depth_shape(x: torch.Tensor, block: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty((n, block * block * c, h // block, w // block))


def space_to_depth_onnx(x: Any, block: int) -> Any:
    return op.SpaceToDepth(x, blocksize=block)


TRANSLATIONS = {torch.ops.edgebll.space_to_depth.default: space_to_depth_onnx}
