"""Fashion-MNIST from the original IDX files, normalised and batched for the block runners.

The data folder holds the four standard files, gzipped (as Debian's ``dataset-fashion-mnist``
installs them) or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

The folder is, in order of precedence: the ``data_dir`` argument (the CLI's ``--data-dir``), the
environment variable ``EDGEBLL_DATA_DIR``, :data:`DEFAULT_DATA_DIR`. Every problem with the
folder or a file is one :class:`~edgebll.errors.DataError` that names the file, says what was
expected and what was found, and ends with a ``hint:`` on how to get the data.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgebll.errors import DataError, EdgeBLLError

DEFAULT_DATA_DIR: str = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "EDGEBLL_DATA_DIR"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of the training images' pixels scaled to [0, 1]
# (raw mean 72.94 / 255). Test images use the training statistics too.
MEAN, STD = 0.2860, 0.3530

IMAGE_SIZE = 28

# The standard files have exactly these many samples. A smaller but well-formed pair of files
# is a partial download or a different dataset, and must not silently train on fewer samples.
_EXPECTED_COUNTS: dict[str, int] = {"train": 60000, "test": 10000}

# Split name -> file-name prefix of the original distribution.
_FILE_PREFIXES: dict[str, str] = {"train": "train", "test": "t10k"}

_HINT = (
    "hint: install the data with `sudo apt-get install dataset-fashion-mnist` "
    f"(it goes to {DEFAULT_DATA_DIR}), or pass --data-dir DIR / set {DATA_DIR_ENV}=DIR "
    "to a folder holding the four Fashion-MNIST files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte; each gzipped as .gz or not)"
)

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code (third magic byte) -> element type. Multi-byte types are big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _fail(where: str | os.PathLike, what: str) -> DataError:
    """Build the one error shape this module raises: ``<file>: <what>; hint: <how to get data>``."""
    return DataError(f"{where}: {what}; {_HINT}")


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
        _check_subset_size(n, len(self))
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


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class Dataset(InMemoryDataset):
    """Images and labels held in memory, in file order.

    ``images`` is float32 ``[N, 1, 28, 28]`` normalised with :data:`MEAN` / :data:`STD`;
    ``labels`` is int64 ``[N]`` with class indices into :data:`CLASSES`.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Invariants of how this module builds a Dataset; other code relies on them for speed.
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(
                f"Dataset images must be float32 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise ValueError(
                f"Dataset labels must be int64 [N], got {self.labels.dtype} "
                f"{list(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"Dataset has {len(self.images)} images but {len(self.labels)} labels"
            )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels


def first_sample(mask: np.ndarray) -> int:
    """The index of the first sample (axis 0) with any True in ``mask`` (per sample: a scalar, labels per token, pixels)."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of ``epoch``: a function of (seed, epoch) alone, so every rank of a
    distributed run, and a resumed run, computes the same batches without being sent them."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def _check_subset_size(n: int, available: int) -> None:
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


def _resolve_data_dir_with_source(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The data folder and where that choice came from (for error messages)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "from --data-dir / the data_dir argument"
    from_env = os.environ.get(DATA_DIR_ENV, "")
    # An empty variable counts as unset, as shells commonly export VAR= to clear it.
    if from_env:
        return Path(from_env).expanduser(), f"from ${DATA_DIR_ENV}"
    return Path(DEFAULT_DATA_DIR), "the default"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$EDGEBLL_DATA_DIR``, else the default."""
    return _resolve_data_dir_with_source(data_dir)[0]


def _read_file_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "file does not exist") from None
    except OSError as error:
        raise _fail(path, f"cannot read the file: {error.strerror or error}") from None
    if path.suffix != ".gz":
        return raw
    if raw[:2] != _GZIP_MAGIC:
        looks_raw = raw[:2] == b"\x00\x00"
        advice = " (it looks like an uncompressed IDX file: drop the .gz from its name)"
        raise _fail(
            path,
            "named .gz but not gzip data: expected the gzip magic bytes 1f 8b, "
            f"got {raw[:2].hex(' ') or 'an empty file'}" + (advice if looks_raw else ""),
        )
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise _fail(
            path,
            f"the gzip stream ends early after {len(raw)} compressed bytes "
            "(truncated download?)",
        ) from None
    except (OSError, zlib.error) as error:  # BadGzipFile (bad CRC or length) is an OSError
        raise _fail(path, f"corrupt gzip stream: {error}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read any IDX file (gzipped when the name ends in ``.gz``) into an array of its shape.

    Checks the magic (two zero bytes, a type code, the number of dimensions), that the type code
    is one IDX defines, and that the file holds exactly the bytes its dimensions promise.
    Multi-byte types come back in native byte order. The array may be a read-only view of the
    file's bytes: copy it before writing into it.
    """
    path = Path(path)
    data = _read_file_bytes(path)
    if len(data) < 4:
        raise _fail(
            path, f"too short for an IDX header: expected at least 4 bytes, got {len(data)}"
        )
    if data[0] != 0 or data[1] != 0 or data[3] == 0:
        gzipped = data[:2] == _GZIP_MAGIC
        advice = " (the data is gzip-compressed: name the file with a .gz suffix)"
        raise _fail(
            path,
            "wrong magic: expected 0x0000TTNN (two zero bytes, type code TT, NN >= 1 dimensions), "
            f"got 0x{data[:4].hex().upper()}" + (advice if gzipped else ""),
        )
    type_code, ndim = data[2], data[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        known = ", ".join(f"0x{code:02X} ({dt.name})" for code, dt in _IDX_DTYPES.items())
        raise _fail(
            path, f"unsupported IDX type code: expected one of {known}, got 0x{type_code:02X}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise _fail(
            path,
            f"header truncated: {ndim} dimensions need a {header_size}-byte header, "
            f"the file holds {len(data)} bytes",
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # math.prod on Python ints: a corrupt header must not overflow into a plausible size.
    expected = math.prod(shape) * dtype.itemsize
    got = len(data) - header_size
    if got != expected:
        problem = "truncated" if got < expected else "longer than its header says"
        raise _fail(
            path,
            f"data {problem}: header dimensions {list(shape)} of {dtype.name} need "
            f"{expected} bytes after the {header_size}-byte header, got {got}",
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size)
    array = array.reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
    return array


def _find_file(directory: Path, stem: str) -> Path:
    """``stem.gz`` or ``stem`` inside ``directory`` (gzipped first, as the datasets ship it)."""
    candidates = [directory / f"{stem}.gz", directory / stem]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise _fail(
        directory,
        f"no {stem} file: looked for {candidates[0].name} and {candidates[1].name}, found neither",
    )


def _load_split(
    directory: Path, split: str, *, expected_count: int | None, limit: int | None = None
) -> Dataset:
    """Read and check one split's image and label files from ``directory``.

    ``expected_count`` is the number of samples the files must hold (``None``: any number, for
    small synthetic files in tests); :func:`load_fashion_mnist` always passes the standard one.
    Only the first ``limit`` images are normalised, but the whole files are checked.
    """
    prefix = _FILE_PREFIXES[split]
    images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")

    images = read_idx(images_path)
    if images.dtype != np.uint8:
        raise _fail(
            images_path, f"wrong pixel type: expected uint8 (IDX type 0x08), got {images.dtype}"
        )
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise _fail(
            images_path,
            f"wrong image size for Fashion-MNIST: expected [N, {IMAGE_SIZE}, {IMAGE_SIZE}], "
            f"got {list(images.shape)}",
        )
    labels = read_idx(labels_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _fail(
            labels_path,
            f"wrong label layout: expected uint8 [N] (IDX magic 0x00000801), "
            f"got {labels.dtype} {list(labels.shape)}",
        )
    if len(images) != len(labels):
        raise _fail(
            labels_path,
            f"count mismatch: {len(labels)} labels but {images_path.name} holds "
            f"{len(images)} images",
        )
    if expected_count is not None and len(images) != expected_count:
        raise _fail(
            images_path,
            f"wrong sample count for the Fashion-MNIST {split} split: expected {expected_count}, "
            f"got {len(images)}; refusing to train on a partial or different dataset "
            "(a truncated download must not silently train on fewer samples)",
        )
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise _fail(
            labels_path,
            f"label values outside 0..{len(CLASSES) - 1}: {bad.size} labels, the first "
            f"at index {bad[0]} is {labels[bad[0]]}",
        )

    if limit is not None:
        _check_subset_size(limit, len(images))
    count = len(images) if limit is None else limit
    return Dataset(_normalise(images[:count]), labels[:count].astype(np.int64))


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` holding ``(v / 255 - MEAN) / STD``."""
    # One float32 allocation and two in-place passes: the 60000-image train set needs 188 MB
    # and no float64 temporaries, which matters on a board. (A 256-entry lookup table gives
    # the float64-exact values but is 7x slower; the difference is at most 1 float32 ulp.)
    normalised = pixels.astype(np.float32).reshape(len(pixels), 1, IMAGE_SIZE, IMAGE_SIZE)
    normalised *= np.float32(1.0 / (255.0 * STD))
    normalised -= np.float32(MEAN / STD)
    return normalised


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> Dataset:
    """Load the Fashion-MNIST ``"train"`` (60000) or ``"test"`` (10000) split, normalised.

    ``data_dir`` overrides ``$EDGEBLL_DATA_DIR``, which overrides :data:`DEFAULT_DATA_DIR`.
    ``limit`` keeps the first ``limit`` samples (the files are still checked in full, so a
    partial download is refused even for a short run).
    """
    if split not in _EXPECTED_COUNTS:
        raise ValueError(f"split must be one of {sorted(_EXPECTED_COUNTS)}, got {split!r}")
    directory, source = _resolve_data_dir_with_source(data_dir)
    if not directory.exists():
        raise _fail(directory, f"data folder ({source}) does not exist")
    if not directory.is_dir():
        raise _fail(directory, f"data folder ({source}) is not a folder")
    return _load_split(directory, split, expected_count=_EXPECTED_COUNTS[split], limit=limit)
