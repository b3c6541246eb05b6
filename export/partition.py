"""Split a model's units into K contiguous blocks of balanced cost."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgebll.errors import ExportError


def unit_costs(units: Sequence[nn.Module], input_shape: tuple[int, ...],
               input_dtype: str = "float32") -> tuple[list[float], list[tuple[int, ...]]]:
    """Forward multiply-accumulates of each unit per sample (conv and linear layers), and its output shape.

    ``input_dtype`` "int64": the first unit takes token ids (an embedding), fed as zeros.
    """
    macs: list[float] = []
    shapes: list[tuple[int, ...]] = []
    count = [0.0]

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            count[0] += float(output[0].numel() * k)
        elif isinstance(module, nn.Linear):
            count[0] += float(module.in_features * module.out_features)

    x = torch.zeros(1, *input_shape, dtype=getattr(torch, input_dtype))
    with torch.no_grad():
        for unit in units:
            handles = [m.register_forward_hook(hook) for m in unit.modules()]
            was_training = unit.training
            unit.eval()  # eval: a batch of one must not touch BatchNorm statistics
            count[0] = 0.0
            x = unit(x)
            unit.train(was_training)
            for h in handles:
                h.remove()
            macs.append(count[0])
            shapes.append(tuple(x.shape[1:]))
    return macs, shapes


def balanced_split(costs: Sequence[float], num_blocks: int) -> list[int]:
    """Boundaries ``[0, b1, ..., len(costs)]`` of ``num_blocks`` contiguous groups minimising the largest group cost.

    Exact dynamic programme over prefix sums; ties go to the earliest split so results are stable.
    """
    n = len(costs)
    if not 1 <= num_blocks <= n:
        raise ExportError(f"cannot split a model of {n} units into {num_blocks} blocks; choose --blocks between 1 and {n}")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    # best[k][i]: smallest max-cost splitting the first i units into k groups
    best = np.full((num_blocks + 1, n + 1), np.inf)
    arg = np.zeros((num_blocks + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, num_blocks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i] - 1e-9:
                    best[k][i], arg[k][i] = cost, j
    bounds = [n]
    for k in range(num_blocks, 0, -1):
        bounds.append(int(arg[k][bounds[-1]]))
    return bounds[::-1]


def check_bounds(bounds: Sequence[int], num_units: int, num_blocks: int) -> list[int]:
    """``bounds`` as a list, refused unless it is ``[0, b1, ..., num_units]``, strictly increasing, of ``num_blocks`` blocks."""
    bounds = [int(b) for b in bounds]
    if len(bounds) != num_blocks + 1 or bounds[0] != 0 or bounds[-1] != num_units or any(
            a >= b for a, b in zip(bounds, bounds[1:])):
        raise ExportError(f"block boundaries must run 0 < ... < {num_units} (the model's units) in {num_blocks} "
                          f"blocks, got {bounds}")
    return bounds


def range_costs(units: Sequence[nn.Module], input_shape: tuple[int, ...],
                heads: Callable[[int, int], Sequence[nn.Module]], input_dtype: str = "float32") -> list[list[float]]:
    """``cost[lo][hi]``: forward MACs per sample of units lo..hi-1 plus ``heads(lo, hi)``, what that block
    trains its local loss with (its head; a Pred-Sim block's two heads), all fed the block's output.

    The head counts because it trains with the block: a conv head on a wide early unit costs a
    quarter of a ResNet basic block. It depends on ``lo`` too: a head is capped at its block's cost.
    """
    macs, shapes = unit_costs(units, input_shape, input_dtype)
    prefix = np.concatenate([[0.0], np.cumsum(macs)])
    n = len(units)

    def cost(lo: int, hi: int) -> float:
        local = sum(unit_costs([module], shapes[hi - 1])[0][0] for module in heads(lo, hi))
        return float(prefix[hi] - prefix[lo] + local)

    return [[cost(lo, hi) if hi > lo else 0.0 for hi in range(n + 1)] for lo in range(n + 1)]
