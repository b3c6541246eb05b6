"""One deployable model from a trained run: the merged forward chain equals the blocks run one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgebll.runtime import Runtime
from tests.test_runtime import synthetic


@pytest.mark.parametrize("all_heads", [False, True])
def test_the_merged_chain_gives_the_blocks_eval_logits(run_copy: Path, tmp_path: Path, all_heads: bool) -> None:
    import onnxruntime as ort

    from edgebll.export.inference import chain_inference_model

    runtime = Runtime.from_run(run_copy, threads=1)
    runtime.train(data=synthetic(48), epochs=1, progress=False)  # trained weights and BatchNorm statistics
    model = chain_inference_model(run_copy, tmp_path / "model.onnx", all_heads=all_heads)

    x = synthetic(20).images
    h, expected = x, []
    for runner in runtime.runners:  # the eval graphs, fp32 messages (no codec)
        result = runner.eval_step(h, np.zeros(len(x), np.int64))
        expected.append(result.logits)
        h = result.message
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    names = [o.name for o in session.get_outputs()]
    assert names == (["logits", "logits_0", "logits_1"] if all_heads else ["logits"])
    got = dict(zip(names, session.run(None, {"x": x})))
    np.testing.assert_allclose(got["logits"], expected[-1], atol=1e-5)
    if all_heads:
        for k in range(2):
            np.testing.assert_allclose(got[f"logits_{k}"], expected[k], atol=1e-5)


def test_bll_chain_needs_no_feedback_block(tmp_path: Path) -> None:
    import onnx
    import torch
    from torch import nn

    from edgebll.export import export_model
    from edgebll.export.inference import chain_inference_model
    from edgebll.export.models import conv_bn_relu

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2))]
    run = export_model(units, out=tmp_path / "bll", method="bll", blocks=2, batch_size=8, progress=False, portable=False)
    model = onnx.load(chain_inference_model(run, tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["x"]  # no prior, no target: the forward chain alone


def test_export_inference_from_the_cli(run_copy: Path, tmp_path: Path) -> None:
    from edgebll.cli import main

    assert main(["export-inference", str(run_copy), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
