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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block run of a tiny conv net on 1x28x28 inputs, exported once per session (read-only: copy it to modify)."""
    import torch
    from torch import nn

    from edgebll.export import export_model
    from edgebll.export.models import conv_bn_relu

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)), nn.Sequential(*conv_bn_relu(8, 8, 2))]
    out = tmp_path_factory.mktemp("runs") / "tiny"
    export_model(units, out=out, blocks=3, batch_size=16, lr=0.01, progress=False, portable=False)
    return out


def portable_units() -> list:
    """Four units that cover the portable graph's backward decompositions: conv (strided), BatchNorm, max-pool,
    linear, LayerNorm, GELU."""
    from torch import nn

    from edgebll.export.models import conv_bn_relu

    return [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)), nn.Sequential(*conv_bn_relu(8, 8, 2)),
            nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.LayerNorm(16), nn.GELU())]


@pytest.fixture(scope="session")
def tiny_portable_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``portable_units`` in 2 bwbpf blocks with their portable graphs, SGD, batch 8 (read-only: copy it to modify)."""
    import torch

    from edgebll.export import export_model

    torch.manual_seed(0)
    return export_model(portable_units(), out=tmp_path_factory.mktemp("portable") / "run", blocks=2, batch_size=8,
                        optimizer="sgd", lr=0.05, progress=False)


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``tiny_run`` that a test may modify."""
    import shutil

    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
