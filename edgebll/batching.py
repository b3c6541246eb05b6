"""Samples held in memory, and their batches: the order of an epoch, full batches, checks on sizes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np

from edgebll.errors import DataError, EdgeBLLError

_Samples = TypeVar("_Samples", bound="InMemoryDataset")


class InMemoryDataset:
    """Batching shared by the in-memory datasets: inputs and labels, two arrays aligned on axis 0.

    A subclass is a frozen dataclass whose first two fields are those arrays (in that order) and
    whose constructor takes them positionally; :meth:`subset` builds one with sliced arrays.
    """

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, labels)``: all samples, in order (the arrays themselves, not copies)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.arrays()[1])

    def subset(self: _Samples, n: int | None) -> _Samples:
        """The first ``n`` samples (views, no copy); ``None`` keeps all of them."""
        if n is None:
            return self
        check_subset_size(n, len(self))
        return self.slice(0, n)

    def slice(self: _Samples, start: int, stop: int) -> _Samples:
        """Samples ``start`` to ``stop`` (views, no copy)."""
        inputs, labels = self.arrays()
        return type(self)(inputs[start:stop], labels[start:stop])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields for this batch size."""
        _check_batch_size(batch_size)
        if drop_last:
            return len(self) // batch_size
        return -(-len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(inputs [B, ...], labels [B, ...])``, both C-contiguous (Fashion-MNIST: images
        ``[B, 1, 28, 28]`` float32 and labels ``[B]`` int64).

        Without ``shuffle`` the batches are views into the dataset in file order (do not write
        into them). With ``shuffle`` the order is
        ``np.random.default_rng((seed, epoch)).permutation(len(self))``: it depends on nothing
        else, so a run resumed at ``epoch`` sees the same batches as one that never stopped.
        The last batch is smaller unless ``drop_last``. ``start_batch`` skips the first batches of
        that order without building them (a run resumed in the middle of an epoch).
        """
        _check_batch_size(batch_size)
        inputs, labels = self.arrays()
        count = self.num_batches(batch_size, drop_last) * batch_size
        first = start_batch * batch_size
        if shuffle:
            order = epoch_order(len(self), seed, epoch)
            for start in range(first, count, batch_size):
                picked = order[start : start + batch_size]
                # Fancy indexing copies into a fresh C-contiguous array.
                yield inputs[picked], labels[picked]
        else:
            for start in range(first, count, batch_size):
                # Slices along the first axis of a C-contiguous array are C-contiguous views;
                # ascontiguousarray only copies if a caller built the Dataset from strided data.
                yield (
                    np.ascontiguousarray(inputs[start : start + batch_size]),
                    np.ascontiguousarray(labels[start : start + batch_size]),
                )


def first_sample(mask: np.ndarray) -> int:
    """The index of the first sample (axis 0) with any True in ``mask`` (per sample: a scalar, labels per token, pixels)."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of ``epoch``: a function of (seed, epoch) alone, so every rank of a
    distributed run, and a resumed run, computes the same batches without being sent them."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def check_subset_size(n: int, available: int) -> None:
    """Refuse a sample limit the data cannot satisfy (a user's --limit ends up here)."""
    if n < 0:
        raise DataError(
            f"asked for the first {n} samples; hint: pass a count >= 0, or None for all"
        )
    if n > available:
        raise DataError(
            f"asked for the first {n} samples but the dataset holds only {available}; "
            f"hint: pass a limit of at most {available}, or none to use all samples"
        )


def full_batches(samples: int, batch_size: int) -> int:
    """Full batches of ``batch_size`` in ``samples`` (training drops the last partial one); refuses none."""
    _check_batch_size(batch_size)
    if samples // batch_size == 0:
        raise EdgeBLLError(f"{samples} training samples make no full batch of {batch_size}")
    return samples // batch_size


def _check_batch_size(batch_size: int) -> None:
    """Refuse batch sizes that would loop forever or yield empty batches."""
    is_integer = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not is_integer or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
