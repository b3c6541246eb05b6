"""The BLL paper's sequence task: reverse a random permutation of 0..L-1, one target per token.

Sample i is a permutation ``tokens[i]`` of ``0..length-1`` and its reversal ``targets[i] =
tokens[i][::-1]``: output position t must copy the input token at position L-1-t, which a model
can only do by attending across positions. The data is synthetic and seeded, so every machine
builds the same train and test sets without a download; the two splits never share a
permutation (10! = 3,628,800 of them, so a test set of unseen ones is cheap to draw).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from edgebll.batching import InMemoryDataset
from edgebll.errors import DataError

DATASET_NAME = "reverse-permutation"
"""The ``run.json`` ``data.dataset`` value of this task."""

SPLITS = ("train", "test")


@dataclass(kw_only=True, slots=True)
class ReversalTask:
    """Which permutations make up the train and test sets (stored in run.json's ``data`` field)."""

    length: int = 10
    """Tokens per sequence; the vocabulary is 0..length-1 (the paper: 10)."""
    train_size: int = 16384
    """Training sequences."""
    test_size: int = 2048
    """Test sequences, none of them a training sequence."""
    seed: int = 0
    """Seed of the draw: the same seed gives the same two splits everywhere."""

    def validate(self) -> None:
        if not 2 <= self.length <= 20:
            raise DataError(f"{DATASET_NAME}: length must be between 2 and 20, got {self.length}")
        for name in ("train_size", "test_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{DATASET_NAME}: {name} must be at least 1, got {getattr(self, name)}")
        available = np.prod(np.arange(1, self.length + 1, dtype=np.float64))  # length!
        if self.train_size + self.test_size > available / 2:
            raise DataError(f"{DATASET_NAME}: {self.train_size} + {self.test_size} distinct sequences asked, but "
                            f"there are only {available:.0f} permutations of {self.length} tokens; hint: ask for at "
                            "most half of them, or a longer --length")

    def to_dict(self) -> dict[str, Any]:
        """The run.json ``data`` entry."""
        return {"dataset": DATASET_NAME, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReversalTask:
        """From run.json's ``data`` entry; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"dataset"})
        if unknown:
            raise DataError(f"{DATASET_NAME}: unknown data settings {unknown} in run.json; expected {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class SequenceDataset(InMemoryDataset):
    """Token sequences and one target per token, held in memory.

    ``tokens`` is int64 ``[N, T]`` (a model's input), ``targets`` int64 ``[N, T]`` (class indices):
    the same ``batches()/subset()/num_batches()`` as the image :class:`~edgebll.data.Dataset`, with
    per-token labels ``[B, T]``.
    """

    tokens: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        for name in ("tokens", "targets"):
            array = getattr(self, name)
            if array.ndim != 2 or array.dtype != np.int64:
                raise ValueError(f"SequenceDataset {name} must be int64 [N, T], got {array.dtype} {list(array.shape)}")
        if self.tokens.shape != self.targets.shape:
            raise ValueError(f"SequenceDataset tokens {list(self.tokens.shape)} and targets "
                             f"{list(self.targets.shape)} differ in shape")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens, self.targets


def _distinct_permutations(count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct random permutations of 0..length-1, int64 ``[count, length]``, in draw order."""
    drawn = np.empty((0, length), dtype=np.int64)
    while len(drawn) < count:
        more = rng.permuted(np.tile(np.arange(length, dtype=np.int64), (count - len(drawn) + 16, 1)), axis=1)
        drawn = np.concatenate([drawn, more])
        # np.unique sorts; keep the first occurrence of each permutation in draw order instead
        _, first = np.unique(drawn, axis=0, return_index=True)
        drawn = drawn[np.sort(first)]
    return drawn[:count]


def load_reversal(split: str = "train", task: ReversalTask | None = None, limit: int | None = None) -> SequenceDataset:
    """The ``"train"`` or ``"test"`` split of the permutation-reversal task (both drawn together from the seed).

    ``limit`` keeps the first ``limit`` sequences of the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    task = task or ReversalTask()
    task.validate()
    rng = np.random.default_rng((task.seed, task.length))
    # one draw for both splits: the test sequences are distinct from the training ones by construction
    tokens = _distinct_permutations(task.train_size + task.test_size, task.length, rng)
    tokens = tokens[: task.train_size] if split == "train" else tokens[task.train_size :]
    data = SequenceDataset(np.ascontiguousarray(tokens), np.ascontiguousarray(tokens[:, ::-1]))
    return data.subset(limit)
