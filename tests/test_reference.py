"""The torch reference path keeps blocks isolated: a block's parameters get zero gradient from every other block's loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebll.errors import ExportError
from edgebll.export import build_blocks
from edgebll.export.models import ModelSpec, conv_bn_relu
from edgebll.export.exporter import plan_blocks
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


def test_reference_trains_every_block_on_its_own_loss() -> None:
    blocks, _, _ = build_blocks(spec(), "predsim", 3)
    reference = TorchReference(blocks)
    x, labels = batch()
    first = reference.train_step(x, labels, 1e-2)
    for _ in range(20):
        last = reference.train_step(x, labels, 1e-2)
    assert all(b < a for a, b in zip(first, last))  # every block learns its own loss on a fixed batch
    assert len(reference.accuracy(x, labels)) == 3


def bll_plans(model: ModelSpec, blocks: int = 3) -> tuple[list[nn.Module], list[nn.Module]]:
    plans = plan_blocks(model, "bll", blocks)
    return ([p.module for p in plans if p.kind == "forward"], [p.module for p in plans if p.kind == "feedback"])


def test_bll_needs_its_feedback_chain() -> None:
    forward, feedback = bll_plans(spec())
    with pytest.raises(ExportError, match=r"bll needs one feedback block per forward block but the last: 2, got 0"):
        TorchReference(forward)
    with pytest.raises(ExportError, match=r"bll needs one feedback block .* got 1"):
        TorchReference(forward, feedback=feedback[:1])
    with pytest.raises(ExportError, match="feedback blocks belong to --method bll"):
        TorchReference(build_blocks(spec(), "bwbpf", 3)[0], feedback=feedback)


def test_bll_losses_reach_their_own_block_only() -> None:
    """The forward losses with the feedback chain's priors: each reaches its own forward block alone."""
    forward, feedback = bll_plans(spec())
    reference = TorchReference(forward, feedback=feedback)
    x, labels = batch()
    priors = [2.0 * b for b in reference.feedback_step(labels, 1e-2)]
    losses = [loss for loss, _ in reference.local_losses(x, labels, priors)]
    assert gradient_reach(forward, losses) == [[i == j for i in range(3)] for j in range(3)]
    assert gradient_reach(feedback, losses) == [[False, False]] * 3  # the priors enter as fixed targets


@pytest.mark.parametrize("cutout", [0, 3])
def test_bll_in_torch_trains_as_the_runtime_does(tmp_path: Path, cutout: int) -> None:
    """Two epochs of a 3-block BLL run: the runtime (ORT artifacts, fp32 messages) and TorchReference.fit
    from the same initial weights, batches, rates, cutout pixels and mixing schedule end with the same
    weights (fit gathers its batches from a device-resident copy of the set: the same batches)."""
    from edgebll.data import Dataset
    from edgebll.export import export_model
    from edgebll.runner import BlockRunner
    from edgebll.runtime import Runtime

    model = spec()
    run = export_model(list(model.units), out=tmp_path / "run", method="bll", blocks=3, batch_size=16, lr=1e-2,
                       input_shape=(1, 8, 8), progress=False, portable=False)
    folders = [run / f"block-{k}" for k in range(3)] + [run / f"block-{k}" / "feedback" for k in range(2)]
    forward, feedback = bll_plans(spec())
    for module, folder in zip([*forward, *feedback], folders, strict=True):
        state = {n: torch.from_numpy(v.copy()) for n, v in BlockRunner(folder).parameters().items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not unexpected and all(n.endswith("num_batches_tracked") for n in missing)
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int64))

    Runtime.from_run(run, threads=1).train(data=data, epochs=2, codec="fp32", seed=3, cutout=cutout, progress=False)
    reference = TorchReference(forward, feedback=feedback)
    assert reference.fit(data, epochs=2, batch_size=16, lr=1e-2, seed=3, cutout_size=cutout, progress=False) == 8
    # With cutout one conv weight of 576 lands 1.8e-4 off (as large as before fit kept the set on the
    # device): AdamW magnifies ORT's and torch's rounding where a gradient is near zero. A square of
    # the wrong size misses by 0.056.
    tolerance = 1e-3 if cutout else 1e-4
    for module, folder in zip([*forward, *feedback], folders, strict=True):
        trained = BlockRunner(folder).parameters()
        for name, value in module.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                np.testing.assert_allclose(trained[name], value.numpy(), atol=tolerance, err_msg=f"{folder.name}/{name}")
    # and both read the same accuracy off the forward chain alone
    runtime_eval = Runtime.from_run(run, threads=1).evaluate(data=data, codec="fp32", progress=False)
    assert reference.evaluate(data) == runtime_eval["per_block_accuracy"]


def test_bf16_runs_the_blocks_under_autocast() -> None:
    """precision="bf16": the blocks compute in bf16 (the first conv's output says so), the weights stay fp32,
    and every block still learns its own loss on a fixed batch; fp32 computes in fp32."""
    x, labels = batch()
    seen: dict[str, torch.dtype] = {}
    for precision in ("fp32", "bf16"):
        blocks, _, _ = build_blocks(spec(), "bwbpf", 3)
        conv = next(m for m in blocks[0].modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, out, p=precision: seen.__setitem__(p, out.dtype))
        reference = TorchReference(blocks, precision=precision)
        first = reference.train_step(x, labels, 1e-2)
        for _ in range(20):
            last = reference.train_step(x, labels, 1e-2)
        assert all(b < a for a, b in zip(first, last)), precision
        assert all(p.dtype == torch.float32 for b in blocks for p in b.parameters())
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ExportError, match=r"unknown precision 'fp16'; choose one of \['fp32', 'bf16'\]"):
        TorchReference(build_blocks(spec(), "bwbpf", 3)[0], precision="fp16")
