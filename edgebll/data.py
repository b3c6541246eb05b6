"""Fashion-MNIST from the original IDX files, normalised and batched for the block runners.

The data folder holds the four standard files, gzipped (as Debian's ``dataset-fashion-mnist``
installs them) or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

Where that folder is and how an IDX file is read: :mod:`edgebll.idx`; batching: :mod:`edgebll.batching`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebll.batching import InMemoryDataset, check_subset_size
from edgebll.idx import FILE_PREFIXES, data_dir_and_source, data_error, find_idx_file, read_idx

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of the training images' pixels scaled to [0, 1]
# (raw mean 72.94 / 255). Test images use the training statistics too.
MEAN, STD = 0.2860, 0.3530

IMAGE_SIZE = 28

# The standard files have exactly these many samples. A smaller but well-formed pair of files
# is a partial download or a different dataset, and must not silently train on fewer samples.
_EXPECTED_COUNTS: dict[str, int] = {"train": 60000, "test": 10000}


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class Dataset(InMemoryDataset):
    """Images and labels held in memory, in file order.

    ``images`` is float32 ``[N, 1, 28, 28]`` normalised with :data:`MEAN` / :data:`STD`;
    ``labels`` is int64 ``[N]`` with class indices into :data:`CLASSES`.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Invariants of how this module builds a Dataset; other code relies on them for speed.
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(
                f"Dataset images must be float32 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise ValueError(
                f"Dataset labels must be int64 [N], got {self.labels.dtype} "
                f"{list(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"Dataset has {len(self.images)} images but {len(self.labels)} labels"
            )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels


def _load_split(
    directory: Path, split: str, *, expected_count: int | None, limit: int | None = None
) -> Dataset:
    """Read and check one split's image and label files from ``directory``.

    ``expected_count`` is the number of samples the files must hold (``None``: any number, for
    small synthetic files in tests); :func:`load_fashion_mnist` always passes the standard one.
    Only the first ``limit`` images are normalised, but the whole files are checked.
    """
    prefix = FILE_PREFIXES[split]
    images_path = find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")

    images = read_idx(images_path)
    if images.dtype != np.uint8:
        raise data_error(
            images_path, f"wrong pixel type: expected uint8 (IDX type 0x08), got {images.dtype}"
        )
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise data_error(
            images_path,
            f"wrong image size for Fashion-MNIST: expected [N, {IMAGE_SIZE}, {IMAGE_SIZE}], "
            f"got {list(images.shape)}",
        )
    labels = read_idx(labels_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise data_error(
            labels_path,
            f"wrong label layout: expected uint8 [N] (IDX magic 0x00000801), "
            f"got {labels.dtype} {list(labels.shape)}",
        )
    if len(images) != len(labels):
        raise data_error(
            labels_path,
            f"count mismatch: {len(labels)} labels but {images_path.name} holds "
            f"{len(images)} images",
        )
    if expected_count is not None and len(images) != expected_count:
        raise data_error(
            images_path,
            f"wrong sample count for the Fashion-MNIST {split} split: expected {expected_count}, "
            f"got {len(images)}; refusing to train on a partial or different dataset "
            "(a truncated download must not silently train on fewer samples)",
        )
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise data_error(
            labels_path,
            f"label values outside 0..{len(CLASSES) - 1}: {bad.size} labels, the first "
            f"at index {bad[0]} is {labels[bad[0]]}",
        )

    if limit is not None:
        check_subset_size(limit, len(images))
    count = len(images) if limit is None else limit
    return Dataset(_normalise(images[:count]), labels[:count].astype(np.int64))


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` holding ``(v / 255 - MEAN) / STD``."""
    # One float32 allocation and two in-place passes: the 60000-image train set needs 188 MB
    # and no float64 temporaries, which matters on a board. (A 256-entry lookup table gives
    # the float64-exact values but is 7x slower; the difference is at most 1 float32 ulp.)
    normalised = pixels.astype(np.float32).reshape(len(pixels), 1, IMAGE_SIZE, IMAGE_SIZE)
    normalised *= np.float32(1.0 / (255.0 * STD))
    normalised -= np.float32(MEAN / STD)
    return normalised


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> Dataset:
    """Load the Fashion-MNIST ``"train"`` (60000) or ``"test"`` (10000) split, normalised.

    ``data_dir`` overrides ``$EDGEBLL_DATA_DIR``, which overrides :data:`edgebll.idx.DEFAULT_DATA_DIR`.
    ``limit`` keeps the first ``limit`` samples (the files are still checked in full, so a
    partial download is refused even for a short run).
    """
    if split not in _EXPECTED_COUNTS:
        raise ValueError(f"split must be one of {sorted(_EXPECTED_COUNTS)}, got {split!r}")
    directory, source = data_dir_and_source(data_dir)
    if not directory.exists():
        raise data_error(directory, f"data folder ({source}) does not exist")
    if not directory.is_dir():
        raise data_error(directory, f"data folder ({source}) is not a folder")
    return _load_split(directory, split, expected_count=_EXPECTED_COUNTS[split], limit=limit)
