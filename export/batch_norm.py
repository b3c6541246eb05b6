"""Train-mode batch norm for the portable training graph, with fewer passes over the activations.

torch's decompositions of ``native_batch_norm`` and its backward walk a full-size activation 13
times per layer (``var_mean`` centres the input, the forward centres it again, the backward twice
more) and keep the temporaries of each walk alive in onnxruntime's arena. Written as one
``autograd.Function`` whose backward keeps the centred input ``xc = x - mean``:

- forward: ``xc``, ``xc²`` (for the variance), ``xc · (γ·rstd) + β``: four passes;
- backward: ``Σ g·xc`` and ``Σ g`` per channel, then ``dx = g·A + xc·B + C`` with per-channel
  ``A = γ·rstd``, ``B = -A·rstd²·Σ g·xc / M``, ``C = -A·Σ g / M``: five passes.

``xc`` takes the place of the input that torch's formula keeps for the backward, so nothing more
stays alive between the two. The running statistics update as torch's does (the unbiased
variance, ``momentum`` as given). :class:`TrainModeBatchNorm` swaps this in for
``F.batch_norm`` in train mode while the step is traced; eval-mode batch norm is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _BatchNormFunction(torch.autograd.Function):
    """Batch statistics normalisation with an affine per channel; returns (y, mean, biased variance)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dims, keepdim=True)
        rstd = (var + eps).rsqrt()
        scale = weight.reshape(mean.shape) * rstd
        ctx.save_for_backward(centred, scale, rstd)
        ctx.mark_non_differentiable(mean, var)
        return centred * scale + bias.reshape(mean.shape), mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _mean: Any, _var: Any) -> tuple[torch.Tensor | None, ...]:
        centred, scale, rstd = ctx.saved_tensors
        dims = [0, *range(2, grad.dim())]
        count = grad.numel() // grad.shape[1]
        grad_sum = grad.sum(dims, keepdim=True)
        grad_dot = (grad * centred).sum(dims, keepdim=True)  # Σ g·xc per channel
        grad_input = grad * scale + (centred * (-scale * rstd * rstd * grad_dot / count) - scale * grad_sum / count)
        grad_weight = (grad_dot * rstd).reshape(-1) if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum.reshape(-1) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None


def batch_norm_train(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float,
                     eps: float) -> torch.Tensor:
    """``F.batch_norm(..., training=True)``: normalise with the batch's statistics and update the
    running ones in place (exponential average with ``momentum``; the variance unbiased)."""
    channels = x.shape[1]
    weight = weight if weight is not None else torch.ones(channels, dtype=x.dtype)
    bias = bias if bias is not None else torch.zeros(channels, dtype=x.dtype)
    y, mean, var = _BatchNormFunction.apply(x, weight, bias, eps)
    with torch.no_grad():
        count = x.numel() // channels
        if running_mean is not None:
            running_mean.copy_(mean.reshape(-1) * momentum + running_mean * (1 - momentum))
        if running_var is not None:
            unbiased = var.reshape(-1) * (count / (count - 1))
            running_var.copy_(unbiased * momentum + running_var * (1 - momentum))
    return y


class TrainModeBatchNorm(TorchFunctionMode):
    """While active, ``F.batch_norm`` in train mode runs :func:`batch_norm_train`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _bind_batch_norm(*args, **kwargs)
            if bound["training"]:
                return batch_norm_train(bound["input"], bound["running_mean"], bound["running_var"],
                                        bound["weight"], bound["bias"], bound["momentum"], bound["eps"])
        return func(*args, **kwargs)


def _bind_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5) -> dict[str, Any]:
    """``F.batch_norm``'s arguments by name (its signature, defaults included)."""
    return {"input": input, "running_mean": running_mean, "running_var": running_var, "weight": weight,
            "bias": bias, "training": training, "momentum": momentum, "eps": eps}
