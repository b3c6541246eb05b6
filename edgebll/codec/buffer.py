"""Where the encoder writes a frame: a new ``bytes`` filled in place, or a caller's buffer at an offset.

``encode`` returns ``bytes`` (immutable, hashable: what a transport sends), but numpy and the C
kernel need a writable buffer. Writing into a ``bytearray`` and copying it into ``bytes`` at the
end costs a second frame-sized allocation, a zero-fill and a copy per message, and two large
allocations per call also defeat glibc's reuse of freed memory: on the benchmark machine each
1 MiB frame then cost ~480 fresh page faults, about 1.5 ms, three times the int8 kernel itself.

On CPython, ``PyBytes_FromStringAndSize(NULL, n)`` is the C API's own way to build a bytes object
in place: it returns a new, unshared object with uninitialised contents, to be filled before
anyone else sees it (CPython's own ``bytes`` constructors do exactly this). The caller must write
every byte and must not use the writable view once the ``bytes`` object has been handed out.
Elsewhere (PyPy, ...) this falls back to ``bytearray`` plus one copy.

A caller that sends the frame behind a header of its own (the envelope of edgebll/links.py) hands
``encode`` its send buffer instead (:func:`frame_region`): the frame is written at an offset in
that buffer, where it is sent from, and is never copied.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Callable

import numpy as np

from edgebll.errors import CodecError

_MIN_NBYTES = 2  # CPython hands out shared singletons for b"" (and, given data, for 1-byte bytes)


class _Storage:
    """What numpy needs to see the storage of a ``bytes`` object as a writable array.

    It holds the ``bytes`` object itself, so the array keeps it alive. (A ctypes array type
    ``c_uint8 * n`` would do the same job, but ctypes caches one type per length, forever.)
    """

    __slots__ = ("__array_interface__", "frame")

    def __init__(self, frame: bytes) -> None:
        address = np.frombuffer(frame, np.uint8).ctypes.data  # its first data byte
        self.__array_interface__ = {"data": (address, False), "shape": (len(frame),), "typestr": "|u1", "version": 3}
        self.frame = frame


def _bytes_in_place() -> Callable[[int], tuple[bytes, np.ndarray]] | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        from_string_and_size = ctypes.pythonapi.PyBytes_FromStringAndSize
    except AttributeError:  # pragma: no cover - a CPython build without the C API exported
        return None
    from_string_and_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    from_string_and_size.restype = ctypes.py_object

    def allocate(nbytes: int) -> tuple[bytes, np.ndarray]:
        frame = from_string_and_size(None, nbytes)
        return frame, np.asarray(_Storage(frame))

    return allocate


_ALLOCATE = _bytes_in_place()


def new_frame(nbytes: int) -> tuple[bytes, np.ndarray]:
    """A new ``bytes`` of `nbytes` (contents undefined) and a writable uint8 array over its bytes.

    Fill every byte through the array, then drop the array and hand out the ``bytes``. Without
    CPython the ``bytes`` is produced by :func:`finish_frame` from the array (one copy).
    """
    assert nbytes >= _MIN_NBYTES, "frames are at least a header long"
    if _ALLOCATE is None:
        return b"", np.empty(nbytes, np.uint8)
    return _ALLOCATE(nbytes)


def finish_frame(frame: bytes, writable: np.ndarray) -> bytes:
    """The filled frame: `frame` itself, or (without CPython's in-place bytes) a copy of `writable`."""
    return frame if _ALLOCATE is not None else writable.tobytes()


def frame_region(out: bytearray | memoryview | np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """A writable uint8 array over ``out[offset:offset + nbytes]``, the bytes of `out` a frame goes to.

    `out` is any writable, C-contiguous buffer (bytearray, memoryview, numpy array); it must hold
    `offset` bytes before the frame and the whole frame after them.
    """
    try:
        view = memoryview(out)
    except TypeError:
        raise CodecError(
            f"out: expected a bytearray, memoryview or numpy array to write the frame into, got {type(out).__name__}"
        ) from None
    if view.readonly:
        raise CodecError(
            f"out: expected a writable buffer, got a read-only {type(out).__name__}; "
            "hint: pass a bytearray or np.empty(n, np.uint8)"
        )
    if not view.c_contiguous:
        raise CodecError("out: expected a contiguous buffer, got a strided one")
    try:
        offset = operator.index(offset)
    except TypeError:
        raise CodecError(f"offset: expected an int, got {type(offset).__name__}") from None
    if offset < 0:
        raise CodecError(f"offset: expected an int >= 0, got {offset}")
    if offset + nbytes > view.nbytes:
        raise CodecError(
            f"out: expected at least {offset + nbytes} bytes (offset {offset} + the {nbytes}-byte frame), "
            f"got {view.nbytes}; hint: size it as offset + frame_nbytes(shape, codec, granularity, group_size)"
        )
    return np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, np.uint8, nbytes, offset)
