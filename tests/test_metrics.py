"""Accuracy counting: one prediction per label, per sample (classifier) or per token (sequence model)."""

from __future__ import annotations

import numpy as np
import pytest

from edgebll.metrics import count_correct


def test_counts_per_sample_and_per_token() -> None:
    logits = np.eye(10, dtype=np.float32)[[3, 1, 4]]
    assert count_correct(logits, np.array([3, 1, 5])) == 2
    # two sequences of three tokens: 4 of the 6 tokens right (not "0 sequences entirely right")
    per_token = np.eye(10, dtype=np.float32)[[[0, 1, 2], [3, 4, 5]]]
    assert count_correct(per_token, np.array([[0, 1, 9], [3, 9, 5]])) == 4


def test_refuses_logits_that_do_not_score_the_labels() -> None:
    with pytest.raises(ValueError, match=r"logits \[2, 10\] do not score labels \[2, 3\]: expected logits \[2, 3, classes\]"):
        count_correct(np.zeros((2, 10)), np.zeros((2, 3), np.int64))
