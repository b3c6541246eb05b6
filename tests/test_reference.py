"""The torch reference path keeps blocks isolated: a block's parameters get zero gradient from every other block's loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgebll.errors import ExportError
from edgebll.export import build_blocks
from edgebll.export.models import ModelSpec, conv_bn_relu
from edgebll.export.reference import TorchReference


def spec() -> ModelSpec:
    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, stride=2)),
             nn.Sequential(*conv_bn_relu(8, 8, stride=2))]
    return ModelSpec(name="tiny", units=units, input_shape=(1, 8, 8), num_classes=10)


def gradient_reach(blocks: list[nn.Module], losses: list[torch.Tensor]) -> list[list[bool]]:
    """reach[j][i]: does block j's loss give any parameter of block i a non-zero gradient?"""
    reach = []
    for loss in losses:
        row = []
        for block in blocks:
            params = list(block.parameters())
            grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
            row.append(any(g is not None and bool(g.abs().sum() > 0) for g in grads))
        reach.append(row)
    return reach


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=generator), torch.tensor([0, 1, 1, 2, 3, 3, 9, 9])


@pytest.mark.parametrize("method, head", [("bwbpf", "conv"), ("bwbpf", "mlp"), ("bwbpf", "linear"), ("predsim", "conv")])
def test_each_local_loss_reaches_its_own_block_only(method: str, head: str) -> None:
    blocks, _, _ = build_blocks(spec(), method, 3, head=head)
    x, labels = batch()
    for block in blocks:
        block.train()
        if method == "predsim" and hasattr(block.head, "fc"):  # a zero decoder sends no gradient on step one
            with torch.no_grad():
                block.head.fc.weight.normal_()
    losses = [loss for loss, _ in TorchReference(blocks).local_losses(x, labels)]
    assert gradient_reach(blocks, losses) == [[i == j for i in range(3)] for j in range(3)]


def test_the_check_catches_a_chain_that_backpropagates_through_blocks() -> None:
    """Control: the same blocks chained without the detach leak every loss into the blocks below."""
    blocks, _, _ = build_blocks(spec(), "bwbpf", 3)
    x, labels = batch()
    losses, h = [], x
    for k, block in enumerate(blocks):
        out = block.train()(h, labels)
        losses.append(out[0])
        h = out[2] if k < 2 else h  # no detach: the bug some public block-wise code has
    assert gradient_reach(blocks, losses) == [[True, False, False], [True, True, False], [True, True, True]]


def test_reference_trains_and_refuses_bll() -> None:
    blocks, _, _ = build_blocks(spec(), "predsim", 3)
    reference = TorchReference(blocks)
    x, labels = batch()
    first = reference.train_step(x, labels, 1e-2)
    for _ in range(20):
        last = reference.train_step(x, labels, 1e-2)
    assert all(b < a for a, b in zip(first, last))  # every block learns its own loss on a fixed batch
    assert len(reference.accuracy(x, labels)) == 3
    with pytest.raises(ExportError, match="bll trains through the runtime"):
        TorchReference(build_blocks(spec(), "bll", 3)[0])
