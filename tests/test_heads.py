"""Local heads: the mlp head, the cap that keeps any head cheaper than its block, ORT parity."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebll.export import OptimizerConfig, build_blocks, build_model, export_block
from edgebll.export.artifacts import GraphInput
from edgebll.export.exporter import BlockPlan
from edgebll.export.heads import ConvHead, LinearHead, MLPHead, PooledHead, head_macs, make_head
from edgebll.export.local_block import LocalBlock
from edgebll.export.models import conv_bn_relu
from edgebll.export.partition import balanced_split, unit_costs
from edgebll.export.pooling import BlockMeanPool
from edgebll.runner import BlockRunner
from test_runner_parity import BATCH, batches, torch_optimizer


def test_mlp_head_is_conv_pool_hidden_classifier() -> None:
    head = make_head("mlp", (32, 14, 14), 10)
    assert isinstance(head, MLPHead)
    assert (head.conv.stride, head.conv.out_channels, head.hidden.out_features, head.fc.out_features) == \
        ((2, 2), 64, 128, 10)
    assert head(torch.randn(2, 32, 14, 14)).shape == (2, 10)
    assert isinstance(make_head("mlp", (1024,), 10), LinearHead)  # a vector activation has nothing to convolve


@pytest.mark.parametrize("name, k", [("vgg8b", 7), ("resnet18", 9), ("cnn-small", 4)])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_no_head_outweighs_its_block(name: str, k: int, kind: str) -> None:
    spec = build_model(name)
    costs, shapes = unit_costs(spec.units, spec.input_shape)
    bounds = balanced_split(costs, k)
    blocks, _, _ = build_blocks(spec, "bwbpf", k, head=kind)
    for b, block in enumerate(blocks):
        block_macs = sum(costs[bounds[b]:bounds[b + 1]])
        assert head_macs(block.head, shapes[bounds[b + 1] - 1]) <= block_macs, (name, b)


def test_cap_pools_only_where_a_head_would_outweigh_its_block() -> None:
    # vgg8b's first layer alone (0.9 M MACs): an unpooled conv head would cost 29 M; pooled 7x7 tiles -> 4x4
    blocks, _, _ = build_blocks(build_model("vgg8b"), "bwbpf", 7, head="conv")
    assert isinstance(blocks[0].head, PooledHead) and blocks[0].head.pool.kernel == 7
    assert all(isinstance(b.head, ConvHead) for b in blocks[1:-1])
    # cnn-small keeps the heads its README numbers were measured with
    blocks, _, _ = build_blocks(build_model("cnn-small"), "bwbpf", 4, head="conv")
    assert [type(b.head) for b in blocks] == [ConvHead, ConvHead, ConvHead, LinearHead]


def test_block_mean_pool_is_avg_pool() -> None:
    x = torch.randn(2, 3, 28, 14)
    torch.testing.assert_close(BlockMeanPool((3, 28, 14), 7)(x), nn.functional.avg_pool2d(x, 7), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kernel 3 does not divide the map 28x14"):
        BlockMeanPool((3, 28, 14), 3)


def test_pooled_mlp_head_trains_in_ort_as_in_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 8))]
    head = make_head("mlp", (8, 8, 8), 10, max_macs=9000)  # unpooled it costs 21,760 MACs: pooled in 2x2 tiles
    assert isinstance(head, PooledHead) and head.pool.kernel == 2
    plan = BlockPlan(LocalBlock(units, head, emits_message=True),
                     [GraphInput("x", (1, 8, 8), "float32", "message"), GraphInput("labels", (), "int64", "labels")],
                     [("loss", "loss"), ("logits", "logits"), ("y", "message")], 0, "forward", ["unit0"])
    reference = copy.deepcopy(plan.module).train()
    config = OptimizerConfig(name="adamw")
    export_block(plan, tmp_path / "b", num_blocks=2, method="bwbpf", model_name="tiny", batch_size=BATCH,
                 optimizer=config)
    runner = BlockRunner(tmp_path / "b")
    opt = torch_optimizer(reference, config, 0.01)
    for x, y in batches(plan.inputs, 3):
        result = runner.train_step(x, y, 0.01)
        opt.zero_grad()
        loss = reference(torch.from_numpy(x), torch.from_numpy(y))[0]
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), abs=1e-5)
    ours = runner.parameters()
    for name, value in reference.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, err_msg=name)
