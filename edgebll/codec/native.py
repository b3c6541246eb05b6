"""ctypes binding of the native codec kernel, libedgebll_codec (csrc/codec.c).

One loader finds the library, loads it once and declares every symbol's argument and return
types; the kernel wrappers below have the same signatures as those of
:mod:`edgebll.codec.reference`, so :mod:`edgebll.codec` can use either module.

The library is installed into the ``edgebll`` package directory by CMake. In an editable install
that directory is in site-packages, not next to this source file, so the loader searches every
entry of ``edgebll.__path__`` and ``importlib.resources.files("edgebll")`` rather than
``__file__``'s folder.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import edgebll
from edgebll.codec import reference
from edgebll.codec.reference import Layout
from edgebll.errors import CodecError, NativeLibraryError

LIBRARY_FILENAMES = ("libedgebll_codec.so", "libedgebll_codec.dylib", "edgebll_codec.dll")
ABI_VERSION = 4  # must equal EDGEBLL_CODEC_ABI_VERSION in csrc/edgebll_codec.h
BUILD_HINT = (
    "hint: build it with `pip install --no-build-isolation -e .` (needs a C compiler and cmake), "
    "or `make`; or use backend='numpy'"
)

# enum edgebll_status in csrc/edgebll_codec.h
STATUS_NAMES = {
    0: "EDGEBLL_OK",
    1: "EDGEBLL_ERR_NULL",
    2: "EDGEBLL_ERR_ALIGN",
    3: "EDGEBLL_ERR_SIZE",
    4: "EDGEBLL_ERR_OVERLAP",
    5: "EDGEBLL_ERR_NONFINITE",
    6: "EDGEBLL_ERR_FP16_OVERFLOW",
    7: "EDGEBLL_ERR_ARGUMENT",
}
# enum edgebll_rounding
ROUNDING_IDS = {"nearest": 0, "stochastic": 1}
_OK, _ERR_NONFINITE, _ERR_FP16_OVERFLOW = 0, 5, 6

_size = ctypes.c_size_t
_pointer = ctypes.c_void_p
_INT_ENCODER = ([_pointer, _size, _size, _pointer, _size, ctypes.c_int, ctypes.c_uint64, _pointer], ctypes.c_int)
_INT_DECODER = ([_pointer, _size, _size, _pointer, _size, _pointer], ctypes.c_int)
# name -> (argtypes, restype); the comment above each is its C prototype.
_SIGNATURES: dict[str, tuple[list[type], type]] = {
    # int edgebll_codec_abi_version(void);
    "edgebll_codec_abi_version": ([], ctypes.c_int),
    # int edgebll_encode_fp32(const float *x, size_t n, float *payload);
    "edgebll_encode_fp32": ([_pointer, _size, _pointer], ctypes.c_int),
    # int edgebll_encode_fp16(const float *x, size_t n, uint16_t *payload);
    "edgebll_encode_fp16": ([_pointer, _size, _pointer], ctypes.c_int),
    # int edgebll_encode_int8(const float *x, size_t n, size_t run, float *scales, size_t n_scales,
    #                         int rounding, uint64_t seed, int8_t *payload);
    "edgebll_encode_int8": _INT_ENCODER,
    # int edgebll_encode_int4(... the same ..., uint8_t *payload);
    "edgebll_encode_int4": _INT_ENCODER,
    # int edgebll_encode_int2(... the same ..., uint8_t *payload);
    "edgebll_encode_int2": _INT_ENCODER,
    # int edgebll_decode_fp32(const float *payload, size_t n, float *out);
    "edgebll_decode_fp32": ([_pointer, _size, _pointer], ctypes.c_int),
    # int edgebll_decode_fp16(const uint16_t *payload, size_t n, float *out);
    "edgebll_decode_fp16": ([_pointer, _size, _pointer], ctypes.c_int),
    # int edgebll_decode_int8(const int8_t *payload, size_t n, size_t run, const float *scales,
    #                         size_t n_scales, float *out);
    "edgebll_decode_int8": _INT_DECODER,
    # int edgebll_decode_int4(const uint8_t *payload, ... the same ...);
    "edgebll_decode_int4": _INT_DECODER,
    # int edgebll_decode_int2(const uint8_t *payload, ... the same ...);
    "edgebll_decode_int2": _INT_DECODER,
}


@dataclass(frozen=True)
class _LoadOutcome:
    """What loading found: the library, or why there is none (remembered, not retried)."""

    library: ctypes.CDLL | None
    problem: str = ""


def search_dirs() -> list[Path]:
    """The folders searched for the library, in order, without duplicates."""
    folders = [Path(entry) for entry in edgebll.__path__]
    try:
        resources = importlib.resources.files("edgebll")
    except (ModuleNotFoundError, TypeError):
        resources = None
    if isinstance(resources, Path):  # a zip or other non-file Traversable cannot hold a .so
        folders.append(resources)
    unique: dict[Path, None] = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), None)
    return list(unique)


def find_library(folders: list[Path]) -> Path | None:
    """The first library file in `folders`, or None."""
    for folder in folders:
        for filename in LIBRARY_FILENAMES:
            candidate = folder / filename
            if candidate.is_file():
                return candidate
    return None


def _declare(library: ctypes.CDLL) -> None:
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype


@functools.cache
def _load() -> _LoadOutcome:
    folders = search_dirs()
    path = find_library(folders)
    if path is None:
        searched = ", ".join(str(folder) for folder in folders)
        return _LoadOutcome(
            None, f"native codec library not found: expected one of {LIBRARY_FILENAMES} in {searched}"
        )
    try:
        library = ctypes.CDLL(str(path))
        _declare(library)
    except (OSError, AttributeError) as error:
        return _LoadOutcome(None, f"native codec library {path} cannot be loaded: {error}")
    version = library.edgebll_codec_abi_version()
    if version != ABI_VERSION:
        return _LoadOutcome(
            None,
            f"native codec library {path} is stale: ABI version expected {ABI_VERSION}, "
            f"got {version}",
        )
    return _LoadOutcome(library)


def load_library() -> ctypes.CDLL:
    """The loaded native library; raises NativeLibraryError (with a build hint) if unavailable."""
    outcome = _load()
    if outcome.library is None:
        raise NativeLibraryError(f"{outcome.problem}; {BUILD_HINT}")
    return outcome.library


def available() -> bool:
    """Whether the native library can be used (searched and loaded once per process)."""
    return _load().library is not None


def _address(array: np.ndarray) -> int:
    # Internal callers pass contiguous, aligned arrays; the C side checks NULL/alignment too.
    assert array.flags.c_contiguous and array.flags.aligned, "kernel arrays must be contiguous"
    return array.ctypes.data


def _check(status: int, function: str, x: np.ndarray | None = None, codec: str = "") -> None:
    """Map a C status code to the CodecError it stands for."""
    if status == _OK:
        return
    if status in (_ERR_NONFINITE, _ERR_FP16_OVERFLOW) and x is not None:
        reference.check_encodable(x, codec)  # raises the precise, located error
    raise CodecError(
        f"native codec: {function} returned {STATUS_NAMES.get(status, status)}; "
        "this is a bug in edgebll (the arguments were checked in Python)"
    )


def encode_fp32(x: np.ndarray, payload: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.encode_fp32`."""
    status = load_library().edgebll_encode_fp32(_address(x), x.size, _address(payload))
    _check(status, "edgebll_encode_fp32", x, "fp32")


def encode_fp16(x: np.ndarray, payload: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.encode_fp16`."""
    status = load_library().edgebll_encode_fp16(_address(x), x.size, _address(payload))
    _check(status, "edgebll_encode_fp16", x, "fp16")


def _encode_int(codec: str, x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
                rounding: str, seed: int) -> None:
    size, run, num_scales = layout
    name = f"edgebll_encode_{codec}"
    status = getattr(load_library(), name)(
        _address(x), size, run, _address(scales), num_scales, ROUNDING_IDS[rounding], seed, _address(payload)
    )
    _check(status, name, x, codec)


def encode_int8(x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
                rounding: str = "nearest", seed: int = 0) -> None:
    """C version of :func:`edgebll.codec.reference.encode_int8`."""
    _encode_int("int8", x, layout, scales, payload, rounding, seed)


def encode_int4(x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
                rounding: str = "nearest", seed: int = 0) -> None:
    """C version of :func:`edgebll.codec.reference.encode_int4`."""
    _encode_int("int4", x, layout, scales, payload, rounding, seed)


def encode_int2(x: np.ndarray, layout: Layout, scales: np.ndarray, payload: np.ndarray,
                rounding: str = "nearest", seed: int = 0) -> None:
    """C version of :func:`edgebll.codec.reference.encode_int2`."""
    _encode_int("int2", x, layout, scales, payload, rounding, seed)


def decode_fp32(payload: np.ndarray, out: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.decode_fp32`."""
    status = load_library().edgebll_decode_fp32(_address(payload), payload.size, _address(out))
    _check(status, "edgebll_decode_fp32")


def decode_fp16(payload: np.ndarray, out: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.decode_fp16`."""
    status = load_library().edgebll_decode_fp16(_address(payload), payload.size, _address(out))
    _check(status, "edgebll_decode_fp16")


def _decode_int(codec: str, payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    size, run, num_scales = layout
    name = f"edgebll_decode_{codec}"
    status = getattr(load_library(), name)(_address(payload), size, run, _address(scales), num_scales, _address(out))
    _check(status, name)


def decode_int8(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.decode_int8`."""
    _decode_int("int8", payload, layout, scales, out)


def decode_int4(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.decode_int4`."""
    _decode_int("int4", payload, layout, scales, out)


def decode_int2(payload: np.ndarray, layout: Layout, scales: np.ndarray, out: np.ndarray) -> None:
    """C version of :func:`edgebll.codec.reference.decode_int2`."""
    _decode_int("int2", payload, layout, scales, out)
