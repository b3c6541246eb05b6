"""The sequence task's data: seeded permutations of 0..9 with their reversal as per-token targets."""

from __future__ import annotations

import numpy as np
import pytest

from edgebll.errors import DataError
from edgebll.run_data import load_run_dataset
from edgebll.sequence_data import ReversalTask, SequenceDataset, load_reversal

SMALL = ReversalTask(train_size=300, test_size=100, seed=5)


def test_every_sequence_is_a_permutation_and_its_target_the_reversal() -> None:
    data = load_reversal("train", SMALL)
    assert len(data) == 300 and data.tokens.shape == (300, 10) and data.tokens.dtype == np.int64
    np.testing.assert_array_equal(np.sort(data.tokens, axis=1), np.tile(np.arange(10), (300, 1)))
    np.testing.assert_array_equal(data.targets, data.tokens[:, ::-1])
    assert data.targets.flags.c_contiguous


def test_splits_are_seeded_distinct_and_disjoint() -> None:
    train, test = load_reversal("train", SMALL), load_reversal("test", SMALL)
    assert len(test) == 100
    np.testing.assert_array_equal(train.tokens, load_reversal("train", SMALL).tokens)  # same seed, same data
    other = load_reversal("train", ReversalTask(train_size=300, test_size=100, seed=6))
    assert not np.array_equal(train.tokens, other.tokens)
    every = np.concatenate([train.tokens, test.tokens])
    assert len(np.unique(every, axis=0)) == 400, "a test sequence was also a training sequence, or one repeats"


def test_batches_have_per_token_labels_and_resume_exactly() -> None:
    data = load_reversal("test", SMALL)
    batches = list(data.batches(32, shuffle=True, seed=1, epoch=2, drop_last=True))
    assert len(batches) == data.num_batches(32, drop_last=True) == 3
    for tokens, labels in batches:
        assert tokens.shape == labels.shape == (32, 10) and labels.dtype == np.int64
        np.testing.assert_array_equal(labels, tokens[:, ::-1])  # shuffling keeps targets with their tokens
    resumed = list(data.batches(32, shuffle=True, seed=1, epoch=2, drop_last=True, start_batch=1))
    np.testing.assert_array_equal(resumed[0][0], batches[1][0])
    head = data.subset(40)
    assert isinstance(head, SequenceDataset) and len(head) == 40
    np.testing.assert_array_equal(head.tokens, data.tokens[:40])
    assert len(load_reversal("test", SMALL, limit=10)) == 10


def test_the_run_config_chooses_the_dataset() -> None:
    data = load_run_dataset(SMALL.to_dict(), "test", limit=7)
    np.testing.assert_array_equal(data.tokens, load_reversal("test", SMALL).tokens[:7])
    with pytest.raises(DataError, match=r"run.json names dataset 'cifar-10'.*expected one of \['fashion-mnist', "
                                        r"'reverse-permutation', 'folder'\]; hint"):
        load_run_dataset({"dataset": "cifar-10"}, "train")
    with pytest.raises(DataError, match=r"unknown data settings \['vocab'\]"):
        load_run_dataset({**SMALL.to_dict(), "vocab": 12}, "train")


@pytest.mark.parametrize("task, match", [
    (ReversalTask(length=1), "length must be between 2 and 20, got 1"),
    (ReversalTask(train_size=0), "train_size must be at least 1, got 0"),
    (ReversalTask(length=4, train_size=10, test_size=5), r"only 24 permutations of 4 tokens; hint"),
])
def test_impossible_tasks_are_refused(task: ReversalTask, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_reversal("train", task)


def test_sequence_dataset_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match=r"tokens must be int64 \[N, T\], got float32"):
        SequenceDataset(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.int64))
    with pytest.raises(ValueError, match=r"differ in shape"):
        SequenceDataset(np.zeros((2, 10), np.int64), np.zeros((2, 9), np.int64))
