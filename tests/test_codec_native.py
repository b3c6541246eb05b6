"""The native library: finding and loading it (or falling back to numpy), and its own argument checks."""

from __future__ import annotations

import ctypes
from pathlib import Path

import codec_helpers
import numpy as np
import pytest
from codec_helpers import FLT_MIN, require_native

from edgebll import codec
from edgebll.codec import native
from edgebll.errors import CodecError, NativeLibraryError

fresh_loader = codec_helpers.fresh_loader  # a pytest fixture: forgets the loaded library around the test


def test_backend_c_without_the_library_raises_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None
) -> None:
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    assert not codec.native_available()
    x = np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6)
    with pytest.raises(NativeLibraryError, match=r"native codec library not found: .*hint: build it with `pip install"):
        codec.encode(x, backend="c")
    with pytest.raises(NativeLibraryError):
        codec.decode(codec.encode(x, backend="numpy"), backend="c")
    frame = codec.encode(x, "int8", granularity="channel")  # auto: silently numpy
    assert frame == codec.encode(x, "int8", granularity="channel", backend="numpy")
    np.testing.assert_array_equal(codec.decode(frame), codec.decode(frame, backend="numpy"))


def test_a_broken_library_file_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None) -> None:
    (tmp_path / native.LIBRARY_FILENAMES[0]).write_bytes(b"not an ELF file")
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    with pytest.raises(NativeLibraryError, match="cannot be loaded: .*hint: build it"):
        native.load_library()
    assert codec.encode(np.ones(3, np.float32)) == codec.encode(np.ones(3, np.float32), backend="numpy")


def test_the_loader_finds_the_installed_library(fresh_loader: None) -> None:
    require_native()
    import edgebll

    found = native.find_library(native.search_dirs())
    assert found is not None and found.parent in {Path(p).resolve() for p in edgebll.__path__}
    assert native.load_library().edgebll_codec_abi_version() == native.ABI_VERSION


def test_c_checks_its_arguments() -> None:
    require_native()
    lib = native.load_library()
    x = np.zeros(8, np.float32)
    payload = np.zeros(8, np.float32)
    scales = np.zeros(2, np.float32)
    q = np.zeros(8, np.int8)
    addr = lambda a: a.ctypes.data  # noqa: E731
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(payload)) == 0
    assert lib.edgebll_encode_int4(addr(x), 8, 4, addr(scales), 2, 0, 0, addr(q)) == 0
    assert lib.edgebll_encode_fp32(None, 8, addr(payload)) == 1  # NULL
    assert lib.edgebll_decode_fp16(addr(q), 2, None) == 1
    assert lib.edgebll_encode_int2(addr(x), 8, 4, None, 2, 0, 0, addr(q)) == 1
    assert lib.edgebll_encode_fp32(addr(x) + 1, 4, addr(payload)) == 2  # misaligned
    assert lib.edgebll_decode_int8(addr(q), 8, 4, addr(scales) + 2, 2, addr(x)) == 2
    assert lib.edgebll_decode_int4(addr(q) + 1, 8, 4, addr(scales), 2, addr(x)) == 0  # byte payloads: any address
    # layouts: runs must be a multiple of n_scales; a short last run only with a scale per run
    assert lib.edgebll_encode_int8(addr(x), 8, 1, addr(scales), 3, 0, 0, addr(q)) == 3  # 8 runs, 3 scales
    assert lib.edgebll_encode_int8(addr(x), 8, 4, addr(scales), 1, 0, 0, addr(q)) == 0  # 2 runs, 1 scale
    assert lib.edgebll_encode_int8(addr(x), 7, 3, addr(scales), 3, 0, 0, addr(q)) == 0  # 3 groups, the last short
    assert lib.edgebll_encode_int8(addr(x), 7, 3, addr(scales), 1, 0, 0, addr(q)) == 3  # short last run, shared scale
    assert lib.edgebll_encode_int8(addr(x), 8, 0, addr(scales), 1, 0, 0, addr(q)) == 3  # empty runs
    assert lib.edgebll_encode_int8(addr(x), 8, 8, addr(scales), 0, 0, 0, addr(q)) == 3  # no scales
    assert lib.edgebll_decode_int2(addr(q), 8, 1, addr(scales), 3, addr(x)) == 3
    assert lib.edgebll_encode_int8(addr(x), 0, 0, addr(scales), 2, 0, 0, addr(q)) == 0  # nothing to do
    assert scales.tolist() == [FLT_MIN, FLT_MIN]
    assert lib.edgebll_encode_int8(addr(x), 2**62, 1, addr(scales), 1, 0, 0, addr(q)) == 3  # n * 4 overflows
    assert lib.edgebll_encode_fp16(addr(x), 2**63, addr(q)) == 3
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(scales), 1, 2, 0, addr(q)) == 7  # no such rounding
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(x) + 16) == 4  # output overlaps input
    assert lib.edgebll_decode_int8(addr(q), 8, 4, addr(scales), 2, addr(q)) == 4
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(scales), 1, 0, 0, addr(x) + 28) == 4  # 4 payload bytes
    assert lib.edgebll_encode_int4(addr(x), 8, 8, addr(x) + 28, 1, 0, 0, addr(q)) == 4  # scales inside x
    x[3] = np.inf
    assert lib.edgebll_encode_int8(addr(x), 8, 1, addr(scales), 2, 0, 0, addr(q)) == 5  # non-finite
    assert lib.edgebll_encode_int2(addr(x), 8, 3, addr(np.zeros(3, np.float32)), 3, 1, 5, addr(q)) == 5
    assert lib.edgebll_encode_fp32(addr(x), 8, addr(payload)) == 5
    assert lib.edgebll_encode_fp16(addr(x), 8, addr(np.zeros(8, np.uint16))) == 6  # Inf out


def test_an_unexpected_c_status_becomes_a_codec_error() -> None:
    with pytest.raises(CodecError, match="edgebll_decode_fp32 returned EDGEBLL_ERR_OVERLAP; this is a bug"):
        native._check(4, "edgebll_decode_fp32")
    with pytest.raises(CodecError, match="returned 99"):
        native._check(99, "edgebll_encode_fp32")


def test_ctypes_signatures_are_declared() -> None:
    require_native()
    lib = native.load_library()
    for name, (argtypes, restype) in native._SIGNATURES.items():
        function = getattr(lib, name)
        assert function.argtypes == argtypes and function.restype is restype is ctypes.c_int  # every function returns an int
