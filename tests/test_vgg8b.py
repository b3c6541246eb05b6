"""vgg8b (the Pred-Sim paper's net) exports with every method and trains one step at batch 8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebll.data import Dataset
from edgebll.export import export_model
from edgebll.export.models import vgg8b
from edgebll.manifest import load_block_manifest
from edgebll.runtime import Runtime

BATCH = 8


def one_batch() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32),
                   rng.integers(0, 10, BATCH).astype(np.int64))


def export_and_step(model: object, out: Path, method: str, blocks: int, **options: object) -> dict:
    run = export_model(model, out=out, method=method, blocks=blocks, batch_size=BATCH, progress=False, **options, portable=False)
    summary = Runtime.from_run(run, threads=1).train(data=one_batch(), epochs=1, progress=False)
    assert summary["steps"] == 1 and all(np.isfinite(summary["epochs"][0]["loss"])), summary["epochs"]
    return summary


def test_full_width_vgg8b_one_layer_per_block_with_predsim(tmp_path: Path) -> None:
    """The paper's setting: every layer its own block (K = 7), full width (~10 s to export here)."""
    summary = export_and_step("vgg8b", tmp_path / "run", "predsim", 7)
    assert len(summary["epochs"][0]["similarity_loss"]) == 6
    messages = [load_block_manifest(tmp_path / "run" / f"block-{k}").output("message") for k in range(6)]
    assert [m.per_sample_shape() for m in messages] == [[128, 28, 28], [256, 14, 14], [256, 14, 14], [512, 7, 7],
                                                        [512, 3, 3], [512, 1, 1]]
    units = json.loads((tmp_path / "run" / "run.json").read_text())["units"]
    assert units == [["conv1"], ["conv2"], ["conv3"], ["conv4"], ["conv5"], ["conv6"], ["fc1"]]


@pytest.mark.parametrize("method, blocks, head", [("bp", 1, "conv"), ("bwbpf", 7, "conv"), ("bwbpf", 4, "linear"),
                                                  ("bwbpf", 7, "mlp"), ("bll", 3, "conv"), ("predsim", 4, "conv")])
def test_narrow_vgg8b_exports_and_trains_with_every_method(tmp_path: Path, method: str, blocks: int,
                                                          head: str) -> None:
    spec = vgg8b(width=8)
    assert spec.name == "vgg8b-w8"
    summary = export_and_step(spec, tmp_path / "run", method, blocks, head=head)
    assert summary["model"] == "vgg8b-w8" and summary["blocks"] == blocks
