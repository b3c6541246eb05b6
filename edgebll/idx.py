"""Fashion-MNIST's files on disk: which folder holds them, finding each file, and reading the IDX format.

The folder is, in order of precedence: the ``data_dir`` argument (the CLI's ``--data-dir``), the
environment variable ``EDGEBLL_DATA_DIR``, :data:`DEFAULT_DATA_DIR`. Every problem with the
folder or a file is one :class:`~edgebll.errors.DataError` that names the file, says what was
expected and what was found, and ends with a ``hint:`` on how to get the data (:func:`data_error`).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from edgebll.errors import DataError

DEFAULT_DATA_DIR: str = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "EDGEBLL_DATA_DIR"

FILE_PREFIXES: dict[str, str] = {"train": "train", "test": "t10k"}
"""Split name -> file-name prefix of the original distribution."""

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


def data_error(where: str | os.PathLike, what: str) -> DataError:
    """Build the one error shape the data files raise: ``<file>: <what>; hint: <how to get data>``."""
    return DataError(f"{where}: {what}; {_HINT}")


def data_dir_and_source(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
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
    return data_dir_and_source(data_dir)[0]


def _read_file_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise data_error(path, "file does not exist") from None
    except OSError as error:
        raise data_error(path, f"cannot read the file: {error.strerror or error}") from None
    if path.suffix != ".gz":
        return raw
    if raw[:2] != _GZIP_MAGIC:
        looks_raw = raw[:2] == b"\x00\x00"
        advice = " (it looks like an uncompressed IDX file: drop the .gz from its name)"
        raise data_error(
            path,
            "named .gz but not gzip data: expected the gzip magic bytes 1f 8b, "
            f"got {raw[:2].hex(' ') or 'an empty file'}" + (advice if looks_raw else ""),
        )
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise data_error(
            path,
            f"the gzip stream ends early after {len(raw)} compressed bytes "
            "(truncated download?)",
        ) from None
    except (OSError, zlib.error) as error:  # BadGzipFile (bad CRC or length) is an OSError
        raise data_error(path, f"corrupt gzip stream: {error}") from None


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
        raise data_error(
            path, f"too short for an IDX header: expected at least 4 bytes, got {len(data)}"
        )
    if data[0] != 0 or data[1] != 0 or data[3] == 0:
        gzipped = data[:2] == _GZIP_MAGIC
        advice = " (the data is gzip-compressed: name the file with a .gz suffix)"
        raise data_error(
            path,
            "wrong magic: expected 0x0000TTNN (two zero bytes, type code TT, NN >= 1 dimensions), "
            f"got 0x{data[:4].hex().upper()}" + (advice if gzipped else ""),
        )
    type_code, ndim = data[2], data[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        known = ", ".join(f"0x{code:02X} ({dt.name})" for code, dt in _IDX_DTYPES.items())
        raise data_error(
            path, f"unsupported IDX type code: expected one of {known}, got 0x{type_code:02X}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise data_error(
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
        raise data_error(
            path,
            f"data {problem}: header dimensions {list(shape)} of {dtype.name} need "
            f"{expected} bytes after the {header_size}-byte header, got {got}",
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size)
    array = array.reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
    return array


def find_idx_file(directory: Path, stem: str) -> Path:
    """``stem.gz`` or ``stem`` inside ``directory`` (gzipped first, as the datasets ship it)."""
    candidates = [directory / f"{stem}.gz", directory / stem]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise data_error(
        directory,
        f"no {stem} file: looked for {candidates[0].name} and {candidates[1].name}, found neither",
    )
