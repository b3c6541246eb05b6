"""Training-time augmentation on the device: numpy only (the runtime imports no torch).

Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per image, centred anywhere in the
image (so it may hang over the border), set to zero, which is the dataset mean after
normalisation. The squares of step t depend only on (seed, step): a resumed run, or another
transport, cuts exactly the same pixels.
"""

from __future__ import annotations

import numpy as np

from edgebll.errors import EdgeBLLError

CUTOUT_STREAM = 0xC0_7007
"""Third seed word: keeps cutout's random stream apart from the shuffling's (seed, epoch)."""


def check_cutout(size: int, inputs_shape: tuple[int, ...], model: str) -> None:
    """Refuse ``--cutout`` for inputs that are not images [N, C, H, W] (the sequence task's tokens)."""
    if size and len(inputs_shape) != 4:
        raise EdgeBLLError(f"--cutout zeroes squares of images [N, C, H, W]; this run's inputs are "
                           f"{list(inputs_shape)} ({model}); hint: drop --cutout")


def cutout(images: np.ndarray, size: int, *, seed: int, step: int) -> np.ndarray:
    """A copy of ``images`` [B, C, H, W] with one ``size``-pixel square per image zeroed on every channel."""
    batch, _, height, width = images.shape
    keep = cutout_keep(batch, height, width, size, seed=seed, step=step)
    return images * keep[:, None].astype(images.dtype)


def cutout_keep(batch: int, height: int, width: int, size: int, *, seed: int, step: int) -> np.ndarray:
    """Step ``step``'s cutout as a mask [B, H, W]: False inside each image's square, True elsewhere.

    The torch reference path multiplies its (device-resident) batch by this mask, so it cuts
    exactly the pixels the runtime cuts.
    """
    if size < 1:
        raise EdgeBLLError(f"--cutout must be a square side of at least 1 pixel, got {size}")
    rng = np.random.default_rng((seed, step, CUTOUT_STREAM))
    centre_y = rng.integers(0, height, batch)
    centre_x = rng.integers(0, width, batch)
    top, left = centre_y - size // 2, centre_x - size // 2
    rows = np.arange(height)[None, :]
    cols = np.arange(width)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # [B, H]
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # [B, W]
    return ~(inside_rows[:, :, None] & inside_cols[:, None, :])
