"""The data a run trains and evaluates on, chosen by run.json's ``data`` field (written at export)."""

from __future__ import annotations

import os
from typing import Any

from edgebll.data import InMemoryDataset, load_fashion_mnist
from edgebll.errors import DataError
from edgebll.sequence_data import DATASET_NAME as REVERSAL, ReversalTask, load_reversal

FASHION_MNIST = "fashion-mnist"
DATASETS = (FASHION_MNIST, REVERSAL)


def load_run_dataset(data: dict[str, Any] | None, split: str, data_dir: str | os.PathLike | None = None,
                     limit: int | None = None) -> InMemoryDataset:
    """The ``split`` ("train" or "test") of the dataset that ``data`` (run.json's ``data``) names.

    A run exported before the field existed has none: it trained on Fashion-MNIST. ``data_dir``
    is where Fashion-MNIST lives; the synthetic sequence task needs no files.
    """
    name = (data or {}).get("dataset", FASHION_MNIST)
    if name == FASHION_MNIST:
        return load_fashion_mnist(split, data_dir, limit=limit)
    if name == REVERSAL:
        return load_reversal(split, ReversalTask.from_dict(data or {}), limit=limit)
    raise DataError(f"run.json names dataset {name!r}, which this runtime does not know; expected one of "
                    f"{list(DATASETS)}; hint: upgrade edgebll on the device, or re-export the run")
