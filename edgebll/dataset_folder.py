"""The user's own data as a dataset folder: raw arrays a board memory-maps, and a small JSON.

``edgebll data import TRAIN.npz --test TEST.npz --out DIR`` (or :func:`write_dataset_folder`)
writes::

    DIR/dataset.json     name, sample shape and dtype, classes, normalisation, per file sha256
    DIR/train_x.npy      the samples as given: uint8 (images), float32, or int64 (token ids)
    DIR/train_y.npy      int64 labels: [N] one class per sample, or [N, T] one per token
    DIR/test_x.npy, DIR/test_y.npy

Loading (:func:`load_dataset_folder`) memory-maps the samples and normalises each batch when it
is read, so what a board holds of the data is the labels, the pages of the file it touches and
one float32 batch (token ids stay int64): uint8 is scaled to [0, 1], then every input channel
(axis 1 of a sample with more than one axis, else the whole sample) gets the mean and standard
deviation measured on the training split at import. A
run exported with ``--data DIR`` records the folder and its hashes in run.json, and every command
that trains or evaluates it reads the folder back through here (numpy only: this runs on boards).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebll.batching import InMemoryDataset, first_sample
from edgebll.errors import DataError
from edgebll.json_files import read_json_file
from edgebll.manifest import sha256_file

INFO_FILE = "dataset.json"
FORMAT = 1
FOLDER = "folder"
"""run.json's ``data.dataset`` for a dataset folder."""
SPLITS = ("train", "test")
INPUT_DTYPES = ("uint8", "float32", "int64")
MAX_INFO_BYTES = 1 << 20
"""dataset.json is a few hundred bytes; anything near a MiB is not one."""
_HINT = "hint: write the folder with `edgebll data import`"


@dataclass(frozen=True, eq=False)
class ArrayDataset(InMemoryDataset):
    """Samples of any per-sample shape (float32, or int64 token ids) and int64 labels ([N] or [N, T])."""

    inputs: np.ndarray
    labels: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs, self.labels


class NormalisedSamples:
    """The samples of a dataset folder as the blocks take them, normalised when read (a batch at a time).

    Indexing returns a normalised numpy array of what it picks; ``shape``/``dtype`` describe the
    whole as if converted, which never happens unless a caller asks with ``np.asarray``.
    """

    def __init__(self, raw: np.ndarray, info: "DatasetInfo") -> None:
        self.raw, self.info = raw, info
        self.dtype = np.dtype(np.int64 if info.dtype == "int64" else np.float32)
        self.shape = tuple(raw.shape)
        self.ndim = raw.ndim

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: Any) -> np.ndarray:
        return _normalised(self.raw[index], self.info)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = _normalised(self.raw, self.info)
        return whole if dtype is None else whole.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class FolderDataset(InMemoryDataset):
    """A split of a dataset folder: memory-mapped samples, normalised batch by batch; labels in memory."""

    raw: np.ndarray
    labels: np.ndarray
    info: "DatasetInfo"

    def arrays(self) -> tuple[NormalisedSamples, np.ndarray]:  # type: ignore[override]
        return NormalisedSamples(self.raw, self.info), self.labels

    def slice(self, start: int, stop: int) -> "FolderDataset":
        return FolderDataset(self.raw[start:stop], self.labels[start:stop], self.info)


@dataclass(frozen=True)
class DatasetInfo:
    """What dataset.json says."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str
    """The stored samples' dtype: uint8, float32 or int64 (token ids)."""
    num_classes: int
    label_shape: tuple[int, ...]
    classes: list[str] | None
    mean: list[float] | None
    std: list[float] | None
    counts: dict[str, int]
    sha256: dict[str, str]

    @property
    def input_dtype(self) -> str:
        """What a model's first unit receives: int64 token ids, else float32."""
        return "int64" if self.dtype == "int64" else "float32"

    def run_data(self, path: Path) -> dict[str, Any]:
        """run.json's ``data`` entry for this folder."""
        return {"dataset": FOLDER, "path": str(path.resolve()), "name": self.name, "sha256": dict(self.sha256)}


def _check_split(split: str, x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.dtype.name not in INPUT_DTYPES:
        raise DataError(f"{where}: x has dtype {x.dtype}; the samples must be uint8, float32 or int64 (token ids); "
                        "hint: convert them with x.astype(np.float32)")
    if x.ndim < 2:
        raise DataError(f"{where}: x has shape {list(x.shape)}; it needs a sample axis first: [N, ...]")
    if y.dtype.kind not in "iu" or y.ndim not in (1, 2) or len(y) != len(x):
        raise DataError(f"{where}: y must hold integer labels [N] or [N, T] for the {len(x)} samples of x, got "
                        f"{y.dtype} {list(y.shape)}")
    if len(x) == 0:
        raise DataError(f"{where}: the {split} split has no samples")
    if x.dtype == np.float32:
        bad = ~np.isfinite(x)
        if bad.any():
            count = int(bad.reshape(len(x), -1).any(axis=1).sum())
            raise DataError(f"{where}: sample {first_sample(bad)} of x holds a non-finite value ({count} such samples)")
    if (y < 0).any():
        raise DataError(f"{where}: sample {first_sample(y < 0)} has a negative label; labels are class indices "
                        "0..classes-1")


def _normalisation(x: np.ndarray) -> tuple[list[float], list[float]] | tuple[None, None]:
    """Per-channel mean and std of training samples (uint8 scaled to [0, 1] first); none for token ids."""
    if x.dtype == np.int64:
        return None, None
    axes = (0, *range(2, x.ndim)) if x.ndim > 2 else (0, 1)
    mean = np.zeros(x.shape[1] if x.ndim > 2 else 1)
    square = np.zeros_like(mean)
    count = 0
    for start in range(0, len(x), 4096):  # in chunks: the float copy of a whole uint8 set may not fit
        chunk = x[start:start + 4096].astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
        mean += chunk.sum(axis=axes)
        square += (chunk * chunk).sum(axis=axes)
        count += chunk.size // len(mean)
    mean /= count
    std = np.sqrt(np.maximum(square / count - mean * mean, 0.0))
    std[std == 0] = 1.0  # a constant channel: shift it, don't divide by zero
    return mean.round(7).tolist(), std.round(7).tolist()


def write_dataset_folder(out: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]], *,
                         name: str | None = None, classes: list[str] | None = None, num_classes: int | None = None,
                         overwrite: bool = False) -> Path:
    """Write a dataset folder from ``splits`` ({"train": (x, y), "test": (x, y)}); returns its path.

    The classes are ``classes`` (names), or ``num_classes`` of them, or one more than the largest
    label. Written into a temporary folder beside ``out`` and renamed, so a failure leaves nothing.
    """
    out = Path(out)
    if sorted(splits) != sorted(SPLITS):
        raise DataError(f"a dataset needs a train and a test split, got {sorted(splits)}")
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; hint: choose another --out, or pass --overwrite")
    arrays = {s: (np.asarray(splits[s][0]), np.asarray(splits[s][1])) for s in SPLITS}
    for split, (x, y) in arrays.items():
        _check_split(split, x, y, f"the {split} split")
    train_x, test_x = arrays["train"][0], arrays["test"][0]
    if train_x.shape[1:] != test_x.shape[1:] or train_x.dtype != test_x.dtype:
        raise DataError(f"the train samples are {train_x.dtype} {list(train_x.shape[1:])} but the test samples "
                        f"{test_x.dtype} {list(test_x.shape[1:])}; both splits need one shape and dtype")
    if arrays["train"][1].shape[1:] != arrays["test"][1].shape[1:]:
        raise DataError("the train and test labels differ in shape per sample")
    largest = max(int(y.max()) for _, y in arrays.values())
    count = len(classes) if classes else (num_classes or largest + 1)
    if largest >= count:
        split = next(s for s, (_, y) in arrays.items() if int(y.max()) == largest)
        sample = first_sample(arrays[split][1] == largest)
        raise DataError(f"the {split} split: sample {sample} has label {largest}, but there are {count} classes; "
                        "labels are class indices 0..classes-1")
    if count < 2:
        raise DataError(f"a classification dataset needs at least 2 classes, got {count}")
    mean, std = _normalisation(train_x)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sha = {}
        for split, (x, y) in arrays.items():
            for kind, array in (("x", x), ("y", y.astype(np.int64))):
                file = tmp / f"{split}_{kind}.npy"
                np.save(file, np.ascontiguousarray(array))
                sha[file.name] = sha256_file(file)
        info = {"format": FORMAT, "name": name or out.name, "sample_shape": list(train_x.shape[1:]),
                "dtype": train_x.dtype.name, "num_classes": count, "label_shape": list(arrays["train"][1].shape[1:]),
                "classes": list(classes) if classes else None, "mean": mean, "std": std,
                "counts": {s: len(arrays[s][0]) for s in SPLITS}, "sha256": sha}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_dataset_info(path: str | os.PathLike) -> DatasetInfo:
    """dataset.json of the folder ``path``, checked."""
    folder = Path(path)
    file = folder / INFO_FILE
    if not file.is_file():
        raise DataError(f"{folder}: no {INFO_FILE}, so it is not a dataset folder; {_HINT}")
    raw = read_json_file(file, MAX_INFO_BYTES, DataError, _HINT)
    try:
        if raw["format"] != FORMAT:
            raise DataError(f"{file}: format {raw['format']!r}, this edgebll reads format {FORMAT}; {_HINT}")
        info = DatasetInfo(name=str(raw["name"]), sample_shape=tuple(int(d) for d in raw["sample_shape"]),
                           dtype=str(raw["dtype"]), num_classes=int(raw["num_classes"]),
                           label_shape=tuple(int(d) for d in raw["label_shape"]), classes=raw.get("classes"),
                           mean=raw.get("mean"), std=raw.get("std"), counts={s: int(raw["counts"][s]) for s in SPLITS},
                           sha256={str(k): str(v) for k, v in raw["sha256"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{file}: missing or malformed field ({type(exc).__name__}: {exc}); {_HINT}") from exc
    if info.dtype not in INPUT_DTYPES or info.num_classes < 2:
        raise DataError(f"{file}: dtype {info.dtype!r} / {info.num_classes} classes are not a dataset this runtime "
                        f"trains; {_HINT}")
    return info


def load_dataset_folder(path: str | os.PathLike, split: str, limit: int | None = None,
                        expected_sha256: dict[str, str] | None = None) -> FolderDataset:
    """The ``split`` of the dataset folder ``path``, its first ``limit`` samples normalised (see the module doc).

    ``expected_sha256`` (run.json's record) must match the folder's files: a run is not trained or
    evaluated on data other than it was exported for without a word.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(path)
    info = read_dataset_info(folder)
    names = [f"{split}_x.npy", f"{split}_y.npy"]
    for file in names:
        if not (folder / file).is_file():
            raise DataError(f"{folder / file}: missing; {_HINT}")
        got = sha256_file(folder / file)
        if got != info.sha256.get(file):
            raise DataError(f"{folder / file}: sha256 {got[:16]}… does not match {INFO_FILE}; the file changed since "
                            f"import; {_HINT}")
        if expected_sha256 is not None and expected_sha256.get(file) not in (None, got):
            raise DataError(f"{folder / file}: not the data this run was exported with (sha256 differs from run.json); "
                            "hint: pass --data with the dataset folder the run was exported for, or re-export")
    try:
        x = np.load(folder / names[0], mmap_mode="r", allow_pickle=False)
        y = np.load(folder / names[1], allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: cannot read the {split} arrays ({exc}); {_HINT}") from exc
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, got {limit}")
        x, y = x[:limit], y[:limit]
    if tuple(x.shape[1:]) != info.sample_shape or x.dtype.name != info.dtype or len(y) != len(x):
        raise DataError(f"{folder / names[0]}: {x.dtype} {list(x.shape)} does not match {INFO_FILE} "
                        f"({info.dtype} [N, {', '.join(map(str, info.sample_shape))}]); {_HINT}")
    # labels were checked at import and the sha256 holds them to that; the run's classes are checked at train/eval
    return FolderDataset(x, np.ascontiguousarray(y, dtype=np.int64), info)


def _normalised(x: np.ndarray, info: DatasetInfo) -> np.ndarray:
    if info.dtype == "int64":
        return np.array(x, dtype=np.int64)  # a copy, not a view of the file
    out = np.array(x, dtype=np.float32)  # the one copy: only the samples read
    if info.dtype == "uint8":
        out *= np.float32(1 / 255)
    if info.mean is not None and info.std is not None:
        shape = (1, len(info.mean), *([1] * (out.ndim - 2))) if out.ndim > 2 else (1, 1)
        out -= np.asarray(info.mean, np.float32).reshape(shape)
        out /= np.asarray(info.std, np.float32).reshape(shape)
    return out


def import_npz(train: str | os.PathLike, test: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
               classes: list[str] | None = None, overwrite: bool = False) -> Path:
    """A dataset folder from two ``.npz`` files, each with arrays ``x`` (samples) and ``y`` (labels)."""
    splits = {}
    for split, source in (("train", Path(train)), ("test", Path(test))):
        try:
            with np.load(source, allow_pickle=False) as data:
                missing = [k for k in ("x", "y") if k not in data.files]
                if missing:
                    raise DataError(f"{source}: no array {missing[0]!r} (it has {data.files}); an .npz for edgebll "
                                    "holds x (the samples, [N, ...]) and y (integer labels): np.savez(f, x=x, y=y)")
                splits[split] = (data["x"], data["y"])
        except (OSError, ValueError) as exc:
            raise DataError(f"{source}: cannot read it as .npz ({exc})") from exc
    try:
        return write_dataset_folder(out, splits, name=name, classes=classes, overwrite=overwrite)
    except DataError as exc:
        raise DataError(f"{train} / {test}: {exc}") from exc
