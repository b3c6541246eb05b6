"""Folded convolutions (``export/folded_conv.py``): which convolutions fold, and that a folded step equals torch's
for batch sizes that are and are not a multiple of the fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from edgebll.export import OptimizerConfig
from edgebll.export.artifacts import GraphInput
from edgebll.export.folded_conv import fold_group
from edgebll.export.local_block import LocalBlock
from edgebll.export.portable import export_portable
from edgebll.graph_memory import _infer_shapes

LR = 1e-2


@pytest.mark.parametrize("filters, height, width, columns, group", [
    (128, 7, 7, 8, 8),      # cnn-small's third stage: 49 positions, 8 samples make 448
    (512, 7, 7, 8, 16),     # 8 samples make 448 positions, fewer than 512 filters
    (64, 14, 14, 15, None),  # 196 positions: MLAS threads it as it is
    (256, 4, 4, 5, None),   # one zero column per 4: the fold ran slower than the plain convolution
    (96, 7, 12, 14, 8),     # 5 wide, padding 2: 2 zero columns per 12
    (96, 5, 10, 12, None),  # a "valid" 3×3 on 7×12: 2 cut columns per 10
    (4096, 7, 7, 8, None),  # would take 64 samples side by side
])
def test_fold_group(filters: int, height: int, width: int, columns: int, group: int | None) -> None:
    assert fold_group(filters, height, width, columns) == group


def _folded(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Convolutions that run on a folded image: their output is unfolded by Reshape, Transpose, Reshape and Slice."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def unfolds(node: onnx.NodeProto, chain: list[str]) -> bool:
        if not chain:
            return True
        after = users.get(node.output[0], [])
        return len(after) == 1 and after[0].op_type == chain[0] and unfolds(after[0], chain[1:])

    return [node for node in model.graph.node
            if node.op_type == "Conv" and unfolds(node, ["Reshape", "Transpose", "Reshape", "Slice"])]


def test_folded_step_equals_torch_at_any_batch(tmp_path: Path) -> None:
    """Three convolutions fold: the two "same" forwards, 96 filters on 84 positions (one with a non-square kernel
    and bias), and the second's input gradient (96 filters). The rest do not: the first's input gradient (4
    filters), the strided convolutions (threaded as they are) and their gradients. One SGD step at batch 8 (a
    multiple of the fold), 5 and 13 (padded) equals torch autograd's, and the memory estimate's shape inference
    sizes the folded images."""
    torch.manual_seed(0)
    units = [nn.Conv2d(4, 96, (3, 5), padding=(1, 2)), nn.BatchNorm2d(96), nn.ReLU(),
             nn.Conv2d(96, 96, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(96, 64, 3, stride=2, padding=1),
             nn.ReLU(), nn.Conv2d(64, 80, 1, stride=2), nn.ReLU()]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(80, 10))
    block = LocalBlock(units, head, emits_message=True)
    inputs = [GraphInput("x", (4, 7, 12), "float32", "message"), GraphInput("labels", (), "int64", "labels")]
    outputs = [("loss", "loss"), ("logits", "logits"), ("y", "message")]
    schema = export_portable(block, inputs, outputs, tmp_path, OptimizerConfig(name="sgd"), where="block 0")
    model = onnx.load(str(tmp_path / "portable_train.onnx"))
    assert len(_folded(model)) == 3
    assert len(_folded(onnx.load(str(tmp_path / "portable_eval.onnx")))) == 2
    session = onnxruntime.InferenceSession(str(tmp_path / "portable_train.onnx"))
    state = np.load(tmp_path / "portable_state.npz")
    rng = np.random.default_rng(0)
    for batch in (8, 5, 13):
        x = rng.standard_normal((batch, 4, 7, 12)).astype(np.float32)
        labels = rng.integers(0, 10, batch).astype(np.int64)
        feeds = {"x": x, "labels": labels, "lr": np.array(LR, np.float32), "step": np.array(1, np.float32)}
        feeds |= {k: state[k] for k in schema.state_keys()}
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        theirs = LocalBlock(units, head, emits_message=True)  # the same modules: a fresh step from the same state
        theirs.train().zero_grad()
        loss, _, y = theirs(torch.from_numpy(x), torch.from_numpy(labels))
        loss.backward()
        np.testing.assert_allclose(got["loss"], loss.item(), rtol=1e-5)
        np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-5, atol=1e-5)
        for name, p in theirs.named_parameters():
            np.testing.assert_allclose(got[f"next:param:{name}"], (p - LR * p.grad).detach().numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"batch {batch}: {name}")
        with torch.no_grad():  # the batch norm statistics moved; put them back for the next batch
            for name, b in theirs.named_buffers():
                b.copy_(torch.from_numpy(state[f"buffer:{name}"]))
    # the memory estimate's shape inference follows the batch padding: at 13 samples, 2 images of 8
    shapes, _ = _infer_shapes(onnx, model, 13)
    assert sorted(shapes[node.output[0]][0] for node in _folded(model)) == [[2, 96, 7, 8 * 13], [2, 96, 7, 8 * 13],
                                                                           [2, 96, 7, 8 * 14]]
