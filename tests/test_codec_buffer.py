"""Where a frame is written: a new bytes filled in place, or a caller's buffer at an offset (the MPI link's
envelope in front), and that neither path stages a copy of the message."""

from __future__ import annotations

import sys
import tracemalloc
import types

import codec_helpers
import numpy as np
import pytest
from codec_helpers import require_native

from edgebll import codec
from edgebll.codec import buffer
from edgebll.errors import CodecError
from edgebll.links import ENVELOPE, MAGIC, FrameSender

backend = codec_helpers.backend  # a pytest fixture: each test that names it runs on both backends


def test_encode_returns_one_new_bytes_object_per_message(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame is built in place as bytes (edgebll/codec/buffer.py); without that, by a copy. Same frame."""
    x = np.random.default_rng(5).standard_normal((4, 8, 3), dtype=np.float32)
    frames = [codec.encode(x, name, granularity="group", group_size=5, backend=backend) for name in codec.CODECS]
    assert all(type(frame) is bytes for frame in frames)
    again = codec.encode(x, "int4", granularity="group", group_size=5, backend=backend)
    assert again == frames[3] and again is not frames[3]
    hash(again)
    monkeypatch.setattr(buffer, "_ALLOCATE", None)
    for name, frame in zip(codec.CODECS, frames):
        assert codec.encode(x, name, granularity="group", group_size=5, backend=backend) == frame


@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_c_path_allocates_nothing_the_size_of_the_message(codec_name: str) -> None:
    """Encode allocates the frame it returns and decode nothing beyond `out`: no staging copies."""
    require_native()
    x = np.random.default_rng(6).standard_normal((16, 64, 16, 16), dtype=np.float32)  # 1 MiB
    out = np.empty_like(x)
    codec.decode(codec.encode(x, codec_name, granularity="group", backend="c"), out, backend="c")  # warm up
    tracemalloc.start()
    try:
        frame = codec.encode(x, codec_name, granularity="group", group_size=16, backend="c")  # 64 KiB of scales
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        codec.decode(frame, out, backend="c")
        decode_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # a few KiB of Python objects (header, ctypes arguments); a staged payload would be >= 64 KiB
    assert encode_peak - len(frame) < 16384
    assert decode_peak < 16384


OUT_KINDS = {
    "bytearray": lambda n: bytearray(b"\xa5" * n),
    "numpy uint8": lambda n: np.full(n, 0xA5, np.uint8),
    "numpy float32": lambda n: np.full(-(-n // 4), np.frombuffer(b"\xa5" * 4, np.float32)[0]),  # any dtype: its bytes
    "memoryview": lambda n: memoryview(bytearray(b"\xa5" * n)),
}


@pytest.mark.parametrize("kind", OUT_KINDS)
@pytest.mark.parametrize("offset", [0, 1, 3, 16, 17])
def test_encode_into_a_callers_buffer_at_an_offset_gives_the_plain_frame(backend: str, kind: str, offset: int) -> None:
    """Every codec, at aligned and odd offsets: the same bytes as encode's own frame, and nothing else written."""
    x = np.random.default_rng(8).standard_normal((4, 8, 3), dtype=np.float32)
    for name in codec.CODECS:
        options = {"granularity": "group", "group_size": 5, "rounding": "stochastic" if name.startswith("int") else
                   "nearest", "seed": 9, "backend": backend}
        frame = codec.encode(x, name, **options)
        out = OUT_KINDS[kind](offset + len(frame) + 7)
        written = codec.encode(x, name, out=out, offset=offset, **options)
        assert isinstance(written, memoryview) and written.tobytes() == frame
        everything = memoryview(out).cast("B").tobytes()
        assert everything[offset : offset + len(frame)] == frame
        assert set(everything[:offset] + everything[offset + len(frame) :]) == {0xA5}  # untouched around it
        np.testing.assert_array_equal(codec.decode(written, backend=backend), codec.decode(frame, backend=backend))


@pytest.mark.parametrize("out, offset, expected", [
    (bytearray(75), 0, r"out: expected at least 76 bytes \(offset 0 \+ the 76-byte frame\), got 75; hint: size it "
                        r"as offset \+ frame_nbytes\(shape, codec, granularity, group_size\)"),
    (bytearray(90), 16, r"out: expected at least 92 bytes \(offset 16 \+ the 76-byte frame\), got 90"),
    (bytes(200), 0, r"out: expected a writable buffer, got a read-only bytes; hint: pass a bytearray"),
    ([0] * 200, 0, "out: expected a bytearray, memoryview or numpy array to write the frame into, got list"),
    (memoryview(bytearray(400))[::2], 0, "out: expected a contiguous buffer, got a strided one"),
    (bytearray(200), -1, r"offset: expected an int >= 0, got -1"),
    (bytearray(200), 1.0, "offset: expected an int, got float"),
])
def test_encode_refuses_an_unusable_out(backend: str, out: object, offset: object, expected: str) -> None:
    x = np.ones((2, 3, 4), np.float32)
    assert codec.frame_nbytes(x.shape, "int8", "channel") == 76
    before = bytes(memoryview(out).cast("B")) if isinstance(out, (bytes, bytearray)) else None
    with pytest.raises(CodecError, match=expected):
        codec.encode(x, "int8", granularity="channel", out=out, offset=offset, backend=backend)  # type: ignore[arg-type]
    if isinstance(out, bytearray):
        assert bytes(out) == before  # refused before anything was written


def test_encode_refuses_an_out_that_overlaps_the_message(backend: str) -> None:
    storage = np.zeros(64, np.float32)
    with pytest.raises(CodecError, match="out: expected memory apart from the message, got a buffer that overlaps it"):
        codec.encode(storage[:8], "fp32", out=storage, offset=16, backend=backend)


@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_encode_into_out_allocates_nothing_the_size_of_the_message(codec_name: str) -> None:
    """With out= the caller's buffer is the frame's only storage: no frame-sized allocation, no staging."""
    require_native()
    x = np.random.default_rng(6).standard_normal((16, 64, 16, 16), dtype=np.float32)  # 1 MiB
    out = np.empty(16 + codec.frame_nbytes(x.shape, codec_name, "group", 16), np.uint8)
    codec.encode(x, codec_name, granularity="group", group_size=16, backend="c", out=out, offset=16)  # warm up
    tracemalloc.start()
    try:
        codec.encode(x, codec_name, granularity="group", group_size=16, backend="c", out=out, offset=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16384  # a few KiB of Python objects; the 64 KiB of scales alone would be more


class _Request:
    def Test(self, status: object = None) -> bool:  # noqa: N802 - mpi4py's name
        return True


class _Comm:
    """What FrameSender needs of an MPI communicator: Issend, recording the buffer it was handed."""

    def __init__(self) -> None:
        self.sent: list[tuple[np.ndarray, int, int]] = []

    def Issend(self, message: list, dest: int, tag: int) -> _Request:  # noqa: N802 - mpi4py's name
        self.sent.append((message[0], dest, tag))
        return _Request()


def test_the_mpi_sender_encodes_the_frame_behind_its_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    """FrameSender.send_written: the frame is encoded straight into the buffer MPI sends, after the envelope, and
    only the bytes written are sent; send(frame) copies a finished frame there instead; a message the codec refuses
    sends nothing."""
    mpi4py = types.ModuleType("mpi4py")
    mpi4py.MPI = types.SimpleNamespace(BYTE="MPI.BYTE")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)  # no MPI needed: a fake communicator
    comm = _Comm()
    sender = FrameSender(comm, rank=2, peer=3, tag=1, depth=1, timeout=1.0, describe="activation")
    x = np.random.default_rng(4).standard_normal((8, 4, 5, 5), dtype=np.float32)
    frame = codec.encode(x, "int4", granularity="channel")
    nbytes = codec.frame_nbytes(x.shape, "int4", "channel")
    sender.send_written(nbytes, lambda out, offset: codec.encode(x, "int4", granularity="channel", out=out,
                                                                 offset=offset), step=7)
    sender.send(frame, step=8)
    sender.send_written(nbytes + 100, lambda out, offset: codec.encode(x, "int4", granularity="channel", out=out,
                                                                       offset=offset), step=9)
    (written, *where), (copied, *_), (roomy, *_) = comm.sent
    assert where == [3, 1]
    assert written.tobytes() == ENVELOPE.pack(MAGIC, 2, 7) + frame
    assert copied.tobytes() == ENVELOPE.pack(MAGIC, 2, 8) + frame
    assert roomy.tobytes() == ENVELOPE.pack(MAGIC, 2, 9) + frame  # not the 100 spare bytes
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CodecError, match="non-finite"):
        sender.send_written(nbytes, lambda out, offset: codec.encode(bad, "int4", granularity="channel", out=out,
                                                                     offset=offset), step=10)
    assert len(comm.sent) == 3
