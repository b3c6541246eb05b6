"""The portable graph's train-mode batch norm (``edgebll.export.batch_norm``) against torch's own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgebll.export.batch_norm import TrainModeBatchNorm


@pytest.mark.parametrize("layer, shape", [
    (nn.BatchNorm1d(5), (7, 5)),
    (nn.BatchNorm1d(5), (7, 5, 6)),
    (nn.BatchNorm2d(5), (7, 5, 4, 3)),
    (nn.BatchNorm3d(5), (3, 5, 2, 3, 2)),
    (nn.BatchNorm2d(5, affine=False), (7, 5, 4, 3)),
    (nn.BatchNorm2d(5, momentum=None), (7, 5, 4, 3)),
    (nn.BatchNorm2d(5, momentum=0.3, eps=1e-3), (7, 5, 4, 3)),
    (nn.BatchNorm2d(5, track_running_stats=False), (7, 5, 4, 3)),
], ids=["1d", "1d-sequence", "2d", "3d", "no-affine", "cumulative", "momentum-eps", "no-running-stats"])
def test_train_mode_batch_norm_equals_torch(layer: nn.BatchNorm2d, shape: tuple[int, ...]) -> None:
    """Outputs, input/weight/bias gradients and running statistics over two steps equal torch's, in float64."""
    torch.manual_seed(0)
    ours = layer.double().train()
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.uniform_(-1.0, 1.0)
    theirs = copy.deepcopy(ours)
    for _ in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
        grad = torch.randn(shape, dtype=torch.float64)
        with TrainModeBatchNorm():
            got = ours(x)
        want = theirs(x)
        torch.testing.assert_close(got, want)
        got_grads = torch.autograd.grad(got, [x, *ours.parameters()], grad)
        want_grads = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)
        for (name, b), w in zip(ours.named_buffers(), theirs.buffers(), strict=True):
            torch.testing.assert_close(b, w, msg=name)


def test_eval_mode_batch_norm_is_left_alone() -> None:
    """In eval mode the running statistics normalise and stay as they were."""
    layer = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(4.0)
    x = torch.randn(4, 3, 2, 2)
    with TrainModeBatchNorm():
        got = layer(x)
    torch.testing.assert_close(got, (x - 0.5) / torch.sqrt(torch.tensor(4.0 + 1e-5)))
    assert torch.equal(layer.running_mean, torch.full((3,), 0.5))
