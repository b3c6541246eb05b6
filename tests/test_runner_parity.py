"""ORT train steps of an exported block equal the same steps in torch (the method's reference).

Two tiny models: a conv net (BatchNorm, conv heads) and a 2-layer transformer on token ids
(Embedding, LayerNorm, matmul + softmax attention, per-token heads and latents).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebll.export import OptimizerConfig, export_block
from edgebll.export.artifacts import GraphInput
from edgebll.export.exporter import plan_blocks
from edgebll.export.models import ModelSpec, conv_bn_relu, transformer
from edgebll.export.transformer import TransformerConfig
from edgebll.runner import BlockRunner

BATCH, STEPS = 8, 4


def tiny_spec() -> ModelSpec:
    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, stride=2), *conv_bn_relu(8, 8))]
    return ModelSpec(name="tiny", units=units, input_shape=(1, 8, 8), num_classes=10)


def tiny_transformer_spec() -> ModelSpec:
    """Embedding + 2 layers at width 8: block 0 of 2 is the embedding and layer 0, block 1 layer 1."""
    torch.manual_seed(0)
    return transformer(TransformerConfig(layers=2, d_model=8, d_ff=16))


SPECS = {"cnn": tiny_spec, "transformer": tiny_transformer_spec}


def export_one(tmp_path: Path, optimizer: OptimizerConfig, index: int = 0, method: str = "bwbpf",
               latent: str = "categorical", model: str = "cnn"):
    """Export graph ``index`` of a tiny model's plan; returns its torch twin, its inputs and the runner."""
    plan = plan_blocks(SPECS[model](), method, 2, head="conv", latent=latent)[index]
    reference = copy.deepcopy(plan.module)
    export_block(plan, tmp_path / "b", num_blocks=2, method=method, model_name=model, batch_size=BATCH,
                 optimizer=optimizer)
    return reference, plan.inputs, BlockRunner(tmp_path / "b")


def random_input(spec: GraphInput, rng: np.random.Generator, batch: int = BATCH) -> np.ndarray:
    """A batch for one graph input: class indices (labels, token ids) for int64, normal floats otherwise."""
    if spec.dtype == "int64":
        return rng.integers(0, 10, (batch, *spec.shape)).astype(np.int64)
    return rng.standard_normal((batch, *spec.shape)).astype(np.float32)


def torch_optimizer(module: nn.Module, config: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr)
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


def batches(inputs: list[GraphInput], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` batches of (message, labels) for a bwbpf block's two inputs."""
    rng = np.random.default_rng(1)
    return [(random_input(inputs[0], rng), random_input(inputs[1], rng)) for _ in range(n)]


@pytest.mark.parametrize("model, config", [("cnn", OptimizerConfig(name="sgd")),
                                           ("cnn", OptimizerConfig(name="adamw", weight_decay=0.01)),
                                           ("transformer", OptimizerConfig(name="adamw", weight_decay=0.01))],
                         ids=["cnn-sgd", "cnn-adamw", "transformer-adamw"])
def test_train_steps_match_torch(tmp_path: Path, model: str, config: OptimizerConfig) -> None:
    lr = 0.05 if config.name == "sgd" else 0.01
    reference, inputs, runner = export_one(tmp_path, config, model=model)
    opt = torch_optimizer(reference, config, lr)
    reference.train()
    for step, (x, y) in enumerate(batches(inputs, STEPS)):
        result = runner.train_step(x, y, lr)
        opt.zero_grad()
        loss, logits, message = reference(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        assert abs(result.loss - loss.item()) < 1e-5, f"step {step}"
        np.testing.assert_allclose(result.logits, logits.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(result.message, message.detach().numpy(), atol=1e-5)
    ours = runner.parameters()
    for name, value in reference.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        # weights after STEPS updates, and BatchNorm running statistics written back by the runner
        np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, err_msg=name)


def test_eval_after_training_matches_torch(tmp_path: Path) -> None:
    config = OptimizerConfig(name="sgd")
    reference, inputs, runner = export_one(tmp_path, config)
    opt = torch_optimizer(reference, config, 0.1)
    data = batches(inputs, STEPS + 1)
    for x, y in data[:STEPS]:
        runner.train_step(x, y, 0.1)
        opt.zero_grad()
        reference(torch.from_numpy(x), torch.from_numpy(y))[0].backward()
        opt.step()
    x, y = data[-1]
    reference.eval()
    with torch.no_grad():
        loss, logits, message = reference(torch.from_numpy(x), torch.from_numpy(y))
    result = runner.eval_step(x, y)
    # eval mode uses the running statistics: equal only if the runner kept them updating
    np.testing.assert_allclose(result.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(result.message, message.numpy(), atol=1e-5)
    assert abs(result.loss - loss.item()) < 1e-5


def test_no_gradient_reaches_the_input(tmp_path: Path) -> None:
    """The message is a graph input: ORT computes no gradient for it, so nothing crosses the boundary."""
    _, _, runner = export_one(tmp_path, OptimizerConfig(name="sgd"))
    names = runner.module.input_names()
    assert names == ["x", "labels"]
    trainable = {name for name, p in runner.state.parameters if p.requires_grad}
    assert "x" not in trainable and all(n.startswith(("body.", "head.")) for n in trainable)


def test_saved_checkpoint_resumes_with_same_weights(tmp_path: Path) -> None:
    _, inputs, runner = export_one(tmp_path, OptimizerConfig(name="adamw"))
    for x, y in batches(inputs, 2):
        runner.train_step(x, y, 0.01)
    runner.save(epoch=1)
    again = BlockRunner(tmp_path / "b")
    assert again.progress == {"epoch": 1, "step": 2}
    before, after = runner.parameters(), again.parameters()
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    x, y = batches(inputs, 3)[2]
    # the optimizer state travelled too: the next step is identical
    np.testing.assert_array_equal(runner.train_step(x, y, 0.01).logits, again.train_step(x, y, 0.01).logits)
    head_conv = next(n for n in runner.parameters() if n.startswith("head.") and n.endswith("conv.weight"))
    np.testing.assert_allclose(runner.parameters()[head_conv], again.parameters()[head_conv], atol=0)


BLL_CASES = [("cnn", "categorical"), ("cnn", "bernoulli"), ("transformer", "categorical")]


@pytest.mark.parametrize("model, latent", BLL_CASES, ids=["-".join(case) for case in BLL_CASES])
def test_bll_forward_step_is_the_kl_gradient_with_a_fixed_posterior(tmp_path: Path, model: str, latent: str) -> None:
    """ORT trains a BLL forward block with the surrogate loss; torch with the method written out:
    KL(rho || alpha), rho the posterior with natural parameters a + m b, detached. One step must
    give the same weights. The transformer's block takes token ids and has one latent per token."""
    from edgebll.export.local_block import bernoulli_kl, categorical_kl

    kl_of = {"categorical": categorical_kl, "bernoulli": bernoulli_kl}[latent]
    config = OptimizerConfig(name="adamw")
    reference, inputs, runner = export_one(tmp_path, config, index=0, method="bll", latent=latent, model=model)
    assert runner.manifest.kind == "forward" and [t.role for t in runner.manifest.inputs] == ["message", "prior"]
    rng = np.random.default_rng(2)
    x = random_input(inputs[0], rng)
    prior = 1.5 * random_input(inputs[1], rng)
    result = runner.train_step(x, prior, 0.01)
    opt = torch_optimizer(reference, config, 0.01)
    reference.train()
    features = reference.body(torch.from_numpy(x))
    a = reference.head(features)
    rho_logits = (a + torch.from_numpy(prior)).detach()  # the posterior is a target: no gradient through it
    kl = kl_of(rho_logits, a)
    kl.backward()
    opt.step()
    assert result.metric == pytest.approx(kl.item(), abs=1e-5)  # the reported KL is the method's loss
    np.testing.assert_allclose(result.logits, a.detach().numpy(), atol=1e-5)
    ours = runner.parameters()
    for name, value in reference.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("model, latent", BLL_CASES, ids=["-".join(case) for case in BLL_CASES])
def test_bll_feedback_step_matches_torch(tmp_path: Path, model: str, latent: str) -> None:
    config = OptimizerConfig(name="adamw")
    # the plan lists the 2 forward blocks, then feedback block 0
    reference, inputs, runner = export_one(tmp_path, config, index=2, method="bll", latent=latent, model=model)
    assert runner.manifest.kind == "feedback" and [t.role for t in runner.manifest.inputs] == ["message", "target"]
    rng = np.random.default_rng(3)
    # one one-hot target per label: [B, 10] for the conv net, [B, T, 10] (one per token) for the transformer
    label_shape = inputs[1].shape[:-1]
    target = np.eye(10, dtype=np.float32)[rng.integers(0, 10, (BATCH, *label_shape))]
    result = runner.train_step(target, target, 0.01)
    opt = torch_optimizer(reference, config, 0.01)
    loss, b, beta = reference(torch.from_numpy(target), torch.from_numpy(target))
    # the read-out loss is the cross-entropy of the feedback distribution against the one-hot target, per label
    flat_b, flat_target = b.reshape(-1, 10), torch.from_numpy(target.reshape(-1, 10))
    if latent == "categorical":
        expected = torch.nn.functional.cross_entropy(flat_b, flat_target.argmax(1))
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(flat_b, flat_target,
                                                                         reduction="sum") / len(flat_b)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    opt.step()
    assert result.loss == pytest.approx(loss.item(), abs=1e-5)
    np.testing.assert_allclose(result.message, beta.detach().numpy(), atol=1e-6)
    ours = runner.parameters()
    for name, value in reference.state_dict().items():
        np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, err_msg=name)
