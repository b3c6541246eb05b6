"""Frozen blocks: the eval graph and weights only, the same forward pass, byte-identical weights, less memory."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgebll.backends import open_block
from edgebll.data import Dataset
from edgebll.errors import EdgeBLLError
from edgebll.frozen import FrozenRunner
from edgebll.memory import estimate_peak_bytes
from edgebll.runtime import Runtime


def synthetic(n: int, shape: tuple[int, ...] = (1, 28, 28)) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_a_frozen_block_computes_what_the_training_runner_evaluates(tiny_portable_run: Path, backend: str) -> None:
    data = synthetic(8)
    full = open_block(tiny_portable_run / "block-0", backend=backend, threads=1)
    frozen = open_block(tiny_portable_run / "block-0", backend=backend, threads=1, frozen=True)
    assert isinstance(frozen, FrozenRunner) and frozen.backend == backend
    assert not hasattr(frozen, "module") and not hasattr(frozen, "train_session")  # nothing of the training side
    want, got = full.eval_step(data.images, data.labels), frozen.eval_step(data.images, data.labels)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.message, want.message, rtol=1e-6, atol=1e-6)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert full.parameters().keys() == frozen.parameters().keys()
    with pytest.raises(EdgeBLLError, match="block 0 was loaded frozen"):
        frozen.train_step(data.images, data.labels, 0.1)


def test_loaded_frozen_trains_the_others_as_the_full_runners_do(tiny_run: Path, tmp_path: Path) -> None:
    """Frozen at load (no training state) or frozen per step (the training runner's eval graph): the same top
    blocks, and the frozen block's checkpoint is its exported state, byte for byte."""
    data = synthetic(64)
    light, heavy = (Path(shutil.copytree(tiny_run, tmp_path / name)) for name in ("light", "heavy"))
    runtime = Runtime.from_run(light, threads=1, freeze_blocks=(0, 1))
    assert [isinstance(r, FrozenRunner) for r in runtime.runners] == [True, True, False]
    summary = runtime.train(data=data, epochs=1, checkpoint_every=2, progress=False)
    assert tuple(summary["config"]["freeze_blocks"]) == (0, 1)
    Runtime.from_run(heavy, threads=1).train(data=data, epochs=1, freeze_blocks=(0, 1), progress=False)
    for k in range(3):
        a = Runtime.from_run(light, threads=1).runners[k].parameters()
        b = Runtime.from_run(heavy, threads=1).runners[k].parameters()
        for name in a:
            assert a[name].tobytes() == b[name].tobytes(), f"block {k} {name}"
    for k in (0, 1):
        assert sha256(light / f"block-{k}" / "trained" / "checkpoint") == sha256(tiny_run / f"block-{k}" / "checkpoint")
    # and it resumes in step with the others
    resumed = Runtime.from_run(light, threads=1, freeze_blocks=(0, 1))
    assert {r.progress["step"] for r in resumed.runners} == {4}
    assert resumed.train(data=data, epochs=2, resume=True, progress=False)["steps"] == 8


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_the_estimate_of_a_frozen_block_drops_gradients_and_optimizer_state(tiny_portable_run: Path,
                                                                           backend: str) -> None:
    block = tiny_portable_run / "block-1"
    training = estimate_peak_bytes(block, backend=backend)
    frozen = estimate_peak_bytes(block, backend=backend, frozen=True)
    assert frozen.gradients == frozen.optimizer_state == 0 and frozen.parameters == training.parameters
    assert frozen.total < training.total and frozen.activations < training.activations
