"""Accuracy counting shared by training and evaluation: one prediction per label, whatever the label's shape."""

from __future__ import annotations

import numpy as np


def count_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    """How many labels the scores predict: ``logits [B, ..., C]`` against ``labels [B, ...]``.

    A classifier has one label per sample (``[B, C]`` vs ``[B]``); a sequence model one per token
    (``[B, T, C]`` vs ``[B, T]``): divide by ``labels.size`` for the per-label (per-token) accuracy.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} do not score labels {list(labels.shape)}: expected "
                         f"logits [{', '.join(map(str, labels.shape))}, classes]")
    return int((logits.argmax(-1) == labels).sum())
