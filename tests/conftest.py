"""Shared fixtures: tiny models that export in well under a second."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path(os.environ.get("EDGEBLL_DATA_DIR", "/usr/share/datasets/fashion-mnist"))


def require_real_data() -> Path:
    """The real Fashion-MNIST folder; in CI its absence is a failure, elsewhere a skip."""
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists() or (FASHION_DIR / "train-images-idx3-ubyte").exists():
        return FASHION_DIR
    message = f"Fashion-MNIST not found in {FASHION_DIR}; `apt-get install dataset-fashion-mnist` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
