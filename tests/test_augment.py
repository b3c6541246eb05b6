"""Cutout on the device: numpy only, one square per image, the same pixels for the same (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from edgebll.augment import cutout
from edgebll.errors import EdgeBLLError


def test_cutout_zeroes_one_square_per_image_and_repeats_per_step() -> None:
    images = np.ones((64, 2, 28, 28), np.float32)
    out = cutout(images, 8, seed=3, step=5)
    assert out.shape == images.shape and out.dtype == np.float32 and images.min() == 1  # a copy
    zeroed = (out == 0).sum(axis=(2, 3))  # per image and channel
    assert (zeroed[:, 0] == zeroed[:, 1]).all()  # every channel loses the same square
    assert zeroed.max() == 64 and 0 < zeroed.min() < 64  # whole squares inside, clipped ones at the border
    for b in range(64):  # one axis-aligned square: the zeroed pixels fill their bounding box
        rows, cols = np.nonzero(out[b, 0] == 0)
        assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows) <= 64
    np.testing.assert_array_equal(out, cutout(images, 8, seed=3, step=5))  # a resumed run cuts the same pixels
    assert not np.array_equal(out, cutout(images, 8, seed=3, step=6))
    assert not np.array_equal(out, cutout(images, 8, seed=4, step=5))


def test_cutout_refuses_an_empty_square() -> None:
    with pytest.raises(EdgeBLLError, match="--cutout must be a square side of at least 1 pixel, got 0"):
        cutout(np.ones((1, 1, 4, 4), np.float32), 0, seed=0, step=0)


def test_a_resumed_run_with_cutout_ends_with_the_same_weights(tiny_run, tmp_path) -> None:
    import shutil

    from edgebll.data import Dataset
    from edgebll.runner import BlockRunner
    from edgebll.runtime import Runtime

    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((32, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 32).astype(np.int64))
    fixed = dict(schedule="constant", progress=False)  # the cosine schedule would differ: it spans --epochs
    runs = {name: shutil.copytree(tiny_run, tmp_path / name) for name in ("straight", "resumed", "plain")}
    Runtime.from_run(runs["straight"], threads=1).train(data=data, epochs=2, cutout=10, **fixed)
    Runtime.from_run(runs["resumed"], threads=1).train(data=data, epochs=1, cutout=10, **fixed)
    Runtime.from_run(runs["resumed"], threads=1).train(data=data, epochs=2, cutout=10, resume=True, **fixed)
    Runtime.from_run(runs["plain"], threads=1).train(data=data, epochs=2, **fixed)
    first = {name: BlockRunner(run / "block-0").parameters()["body.0.0.weight"] for name, run in runs.items()}
    np.testing.assert_array_equal(first["straight"], first["resumed"])
    assert not np.allclose(first["straight"], first["plain"])  # cutout changed what block 0 saw
