"""The data a run trains and evaluates on, chosen by run.json's ``data`` field (written at export)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgebll.batching import InMemoryDataset
from edgebll.data import load_fashion_mnist
from edgebll.dataset_folder import FOLDER, INFO_FILE, load_dataset_folder, read_dataset_info
from edgebll.errors import DataError
from edgebll.sequence_data import DATASET_NAME as REVERSAL, ReversalTask, load_reversal

FASHION_MNIST = "fashion-mnist"
DATASETS = (FASHION_MNIST, REVERSAL, FOLDER)


def is_dataset_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a dataset folder (``edgebll data import``), not a folder of Fashion-MNIST files."""
    return path is not None and (Path(path) / INFO_FILE).is_file()


def resolve_run_data(data: dict[str, Any] | None, data_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """run.json's ``data``, or the dataset folder ``data_dir`` when one is given (``--data``): what is read."""
    if is_dataset_folder(data_dir):
        return read_dataset_info(data_dir).run_data(Path(data_dir))
    return data


def same_data(recorded: dict[str, Any] | None, used: dict[str, Any] | None) -> bool:
    """Whether ``used`` is the dataset the run was exported with (by content, wherever it lies)."""
    recorded, used = recorded or {"dataset": FASHION_MNIST}, used or {"dataset": FASHION_MNIST}
    if recorded.get("dataset") != used.get("dataset"):
        return False
    return recorded.get("dataset") != FOLDER or recorded.get("sha256") == used.get("sha256")


def load_run_dataset(data: dict[str, Any] | None, split: str, data_dir: str | os.PathLike | None = None,
                     limit: int | None = None) -> InMemoryDataset:
    """The ``split`` ("train" or "test") of the dataset that ``data`` (run.json's ``data``) names.

    A run exported before the field existed has none: it trained on Fashion-MNIST. ``data_dir``
    is where Fashion-MNIST lives, or a dataset folder (``--data``), which is then read whatever the
    run was exported with; a run exported with a dataset folder reads the one at the path run.json
    records unless ``data_dir`` names where it lies here. The synthetic sequence task needs no files.
    """
    name = (data or {}).get("dataset", FASHION_MNIST)
    if is_dataset_folder(data_dir):  # --data: this folder, whatever the run was exported with
        return load_dataset_folder(data_dir, split, limit=limit)
    if name == FOLDER:
        folder = (data or {}).get("path")
        if not folder:
            raise DataError("run.json names a dataset folder without its path; hint: pass --data DIR")
        if not is_dataset_folder(folder):
            raise DataError(f"{folder}: the run's dataset folder is not there; hint: copy it to this machine and pass "
                            "--data DIR")
        return load_dataset_folder(folder, split, limit=limit, expected_sha256=(data or {}).get("sha256"))
    if name == FASHION_MNIST:
        return load_fashion_mnist(split, data_dir, limit=limit)
    if name == REVERSAL:
        return load_reversal(split, ReversalTask.from_dict(data or {}), limit=limit)
    raise DataError(f"run.json names dataset {name!r}, which this runtime does not know; expected one of "
                    f"{list(DATASETS)}; hint: upgrade edgebll on the device, or re-export the run")
