"""The validation split: the last N training images, never trained on, reported per epoch in train.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebll.data import Dataset
from edgebll.errors import EdgeBLLError
from edgebll.runtime import Runtime
from edgebll.validation import split_validation, training_data


def numbered(n: int) -> Dataset:
    """Image i is filled with the value i, so a test can see which images a split holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 28, 28)).copy()
    return Dataset(images, (np.arange(n) % 10).astype(np.int64))


def test_validation_is_the_last_images_and_limit_takes_from_the_rest() -> None:
    train, validation = training_data(numbered(100), None, limit=30, val_split=20)
    assert train.images[:, 0, 0, 0].tolist() == list(range(30))
    assert validation.images[:, 0, 0, 0].tolist() == list(range(80, 100))
    train, validation = training_data(numbered(100), None, limit=None, val_split=0)
    assert len(train) == 100 and validation is None
    with pytest.raises(EdgeBLLError, match=r"--val-split 100: expected between 1 and 99 of the 100 training samples"):
        split_validation(numbered(100), 100)


def test_train_reports_validation_accuracy_per_epoch(run_copy: Path) -> None:
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((96, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 96).astype(np.int64))
    summary = Runtime.from_run(run_copy, threads=1).train(data=data, epochs=2, val_split=32, cutout=6, progress=False)
    assert summary["samples"] == 2 * 64  # the 32 held-out images are never trained on
    for epoch in summary["epochs"]:
        assert len(epoch["validation_accuracy"]) == 3 and all(0 <= a <= 1 for a in epoch["validation_accuracy"])
        assert epoch["validation_loss"] > 0
    assert json.loads((run_copy / "train.json").read_text())["config"]["val_split"] == 32
    # the same images through evaluate() give the same numbers as the last epoch's validation
    held_out = Dataset(data.images[64:], data.labels[64:])
    again = Runtime.from_run(run_copy, threads=1).evaluate(data=held_out, progress=False)
    assert again["per_block_accuracy"] == summary["epochs"][-1]["validation_accuracy"]
    assert again["test_loss"] == summary["epochs"][-1]["validation_loss"]
