"""Pred-Sim blocks: the torch reference is the paper's method, and one ORT step equals it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgebll.errors import ExportError
from edgebll.export import OptimizerConfig, export_block, export_model
from edgebll.export.exporter import plan_blocks
from edgebll.export.models import ModelSpec, conv_bn_relu
from edgebll.export.predsim import (
    PredictionHead, PredSimBlock, PredSimConfig, label_similarity, similarity_matrix, spatial_std,
)
from edgebll.export.pooling import MatrixAveragePool, pooling_for
from edgebll.runner import BlockRunner

BATCH = 8


def odd_spec() -> ModelSpec:
    """7x7 maps: the prediction term must pool with padding to reach a small feature cap."""
    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, stride=2))]
    return ModelSpec(name="tiny", units=units, input_shape=(1, 7, 7), num_classes=10)


def export_predsim_block(tmp_path: Path, config: PredSimConfig, random_decoder: bool) -> tuple[nn.Module, BlockRunner]:
    plan = plan_blocks(odd_spec(), "predsim", 2, predsim=config)[0]
    assert isinstance(plan.module, PredSimBlock)
    if random_decoder:  # the zero-initialised decoder sends no gradient into the body on step one; test that path too
        with torch.no_grad():
            plan.module.head.fc.weight.normal_(0, 0.3)
    reference = copy.deepcopy(plan.module)
    export_block(plan, tmp_path / "b", num_blocks=2, method="predsim", model_name="tiny", batch_size=BATCH,
                 optimizer=OptimizerConfig(name="adamw"))
    return reference, BlockRunner(tmp_path / "b")


def paper_loss(block: PredSimBlock, x: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """The method as the paper's code writes it: torch's std and cross-entropy, a detached one-hot target."""
    y = block.body(x)
    logits = block.head(y)
    z = block.similarity.conv(y)
    features = z.flatten(2).std(dim=2)
    centred = features - features.mean(dim=1, keepdim=True)
    unit = centred / (1e-8 + centred.norm(dim=1, keepdim=True))
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    target = similarity_matrix(one_hot).detach()
    sim = torch.nn.functional.mse_loss(unit @ unit.t(), target)
    return (1 - beta) * torch.nn.functional.cross_entropy(logits, labels) + beta * sim, logits, y, sim


@pytest.mark.parametrize("random_decoder", [False, True], ids=["zero-decoder", "random-decoder"])
def test_one_ort_step_equals_the_paper_method_in_torch(tmp_path: Path, random_decoder: bool) -> None:
    config = PredSimConfig(beta=0.7, max_features=16)  # a mix where both terms matter; a cap that forces pooling
    reference, runner = export_predsim_block(tmp_path, config, random_decoder)
    assert [t.role for t in runner.manifest.inputs] == ["message", "labels"]
    assert [t.role for t in runner.manifest.outputs][:4] == ["loss", "logits", "message", "metric"]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((BATCH, 1, 7, 7)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 3, 3, 3, 9], dtype=np.int64)  # repeated classes: off-diagonal targets of 1
    before = reference.body[0][0].weight.detach().clone()
    result = runner.train_step(x, labels, 0.01)
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0)  # OptimizerConfig's default
    reference.train()
    loss, logits, y, sim = paper_loss(reference, torch.from_numpy(x), torch.from_numpy(labels), config.beta)
    loss.backward()
    opt.step()
    assert result.loss == pytest.approx(loss.item(), abs=1e-5)
    assert result.metric == pytest.approx(sim.item(), abs=1e-5)
    np.testing.assert_allclose(result.logits, logits.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(result.message, y.detach().numpy(), atol=1e-5)
    ours = runner.parameters()
    for name, value in reference.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, err_msg=name)
    assert not np.allclose(ours["body.0.0.weight"], before.numpy(), atol=1e-4)  # the local loss reached the body


def test_label_similarity_is_the_cosine_similarity_of_one_hot_labels() -> None:
    labels = torch.tensor([0, 3, 3, 9, 0, 1])
    expected = similarity_matrix(torch.nn.functional.one_hot(labels, 10).float())
    torch.testing.assert_close(label_similarity(labels, 10), expected, atol=1e-6, rtol=0)
    assert label_similarity(labels, 10)[1, 2] == 1 and label_similarity(labels, 10)[0, 1] == pytest.approx(-1 / 9)


@pytest.mark.parametrize("side, kernel, padding", [(7, 4, 2), (28, 8, 4), (14, 8, 4), (3, 2, 1), (8, 2, 0)])
def test_matrix_pool_is_torch_avg_pool(side: int, kernel: int, padding: int) -> None:
    x = torch.randn(2, 3, side, side)
    pool = MatrixAveragePool((3, side, side), kernel, padding)
    torch.testing.assert_close(pool(x), nn.functional.avg_pool2d(x, kernel, kernel, padding), atol=1e-6, rtol=1e-6)
    assert "matrix" not in pool.state_dict()  # a graph constant, not a checkpoint entry


def test_spatial_std_is_torch_unbiased_std() -> None:
    z = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(spatial_std(z), z.flatten(2).std(dim=2), atol=1e-6, rtol=1e-6)


def _ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Every graph input and initializer that ``tensor`` depends on."""
    producers = {out: node for node in model.graph.node for out in node.output}
    seen, stack, leaves = set(), [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producers:
            stack.extend(i for i in producers[name].input if i)
        elif name:
            leaves.add(name)
    return leaves


def test_label_similarity_target_has_no_parameter_on_its_path(tmp_path: Path) -> None:
    """ONNX has no stop-gradient: the B x B target must depend on the labels input alone."""
    _, runner = export_predsim_block(tmp_path, PredSimConfig(), random_decoder=False)
    model = onnx.load(str(runner.block_dir / "training_model.onnx"))
    parameters = {name for name, _ in runner.state.parameters}
    equal = [n for n in model.graph.node if n.op_type == "Equal"]
    assert equal, "the label-similarity matrix (Equal of labels) is missing from the graph"
    for node in equal:
        leaves = _ancestors(model, node.output[0])
        assert "labels" in leaves and not leaves & parameters, leaves


@pytest.mark.parametrize("shape, kernel, features", [
    ((128, 28, 28), 8, 128 * 4 * 4), ((256, 28, 28), 16, 256 * 2 * 2), ((512, 14, 14), 8, 512 * 2 * 2),
    ((512, 7, 7), 4, 512 * 2 * 2), ((512, 3, 3), 2, 512 * 2 * 2), ((64, 4, 4), 1, 64 * 16), ((4, 7, 7), 4, 16),
])
def test_prediction_head_pools_to_the_feature_cap(shape: tuple[int, ...], kernel: int, features: int) -> None:
    cap = 2048 if shape[0] > 4 else 16
    assert pooling_for(shape, cap)[0] == kernel
    head = PredictionHead(shape, 10, cap)
    assert head.fc.in_features == features <= cap
    assert not head.fc.weight.any() and not head.fc.bias.any()  # zero-initialised, as in the paper
    assert head(torch.randn(2, *shape)).shape == (2, 10)


def test_predsim_export_options(tmp_path: Path) -> None:
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 4, stride=2))]
    with pytest.raises(ExportError, match=r"--method predsim needs at least 2 blocks"):
        export_model(units, out=tmp_path / "a", method="predsim", blocks=1, progress=False, portable=False)
    with pytest.raises(ExportError, match=r"--predsim-beta must be in \[0, 1\].*got 1.5"):
        export_model(units, out=tmp_path / "b", method="predsim", blocks=2, predsim=PredSimConfig(beta=1.5),
                     progress=False, portable=False)


def test_cli_exports_trains_and_evaluates_predsim(tmp_path: Path) -> None:
    import json

    from conftest import require_real_data
    from edgebll.cli import main

    run, data = tmp_path / "run", ["--data-dir", str(require_real_data()), "--no-progress", "--threads", "1"]
    assert main(["export", "--model", "cnn-small", "--method", "predsim", "--blocks", "2", "--batch-size", "16", "--no-portable",
                 "--predsim-beta", "0.9", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["predsim"] == {"beta": 0.9, "max_features": 2048}
    assert main(["train", str(run), "--limit", "64", *data]) == 0
    epoch = json.loads((run / "train.json").read_text())["epochs"][0]
    assert epoch["samples"] == 64 and len(epoch["similarity_loss"]) == 1 and 0 < epoch["similarity_loss"][0] < 2
    assert main(["eval", str(run), "--limit", "100", *data]) == 0
    assert json.loads((run / "eval.json").read_text())["method"] == "predsim"


def test_vector_activations_train_without_conv_or_pooling(tmp_path: Path) -> None:
    """An MLP block (activation [B, F]): similarity of the features themselves, the decoder on all of them."""
    torch.manual_seed(0)
    units = [nn.Sequential(nn.Flatten(), nn.Linear(49, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 16), nn.ReLU())]
    spec = ModelSpec(name="mlp", units=units, input_shape=(1, 7, 7), num_classes=10)
    plan = plan_blocks(spec, "predsim", 2)[0]
    assert plan.module.similarity.conv is None and isinstance(plan.module.head.pool, nn.Identity)
    export_block(plan, tmp_path / "b", num_blocks=2, method="predsim", model_name="mlp", batch_size=BATCH,
                 optimizer=OptimizerConfig(name="sgd"))
    x = np.random.default_rng(0).standard_normal((BATCH, 1, 7, 7)).astype(np.float32)
    result = BlockRunner(tmp_path / "b").train_step(x, np.arange(BATCH, dtype=np.int64), 0.1)
    assert np.isfinite(result.loss) and result.message.shape == (BATCH, 32)
