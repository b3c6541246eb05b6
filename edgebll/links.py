"""Point-to-point links between MPI ranks: codec frames in numpy buffers, a bounded number in flight.

A link carries one kind of message (activations up, or BLL's beta down) from one rank to its
neighbour. Every message is an envelope (magic, sending rank, step) followed by a codec frame,
sent as raw bytes with nonblocking synchronous sends (``Issend``) into receive buffers the peer
posted in advance (``Irecv``): nothing is pickled, nothing is copied on the receiving side, and
since a synchronous send completes only once the peer has matched it, at most ``depth`` frames
per link exist on each side. That is the back-pressure: a block that runs ahead of its
neighbour waits instead of piling up messages.

Every wait has a deadline (``timeout``): a neighbour that died or hangs is named in the error
instead of the run hanging forever.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Any, TypeVar

import numpy as np

from edgebll.errors import TrainingError

ENVELOPE = struct.Struct("<4sIq")
"""magic b"EBLM", sending rank (uint32), step (int64), little-endian; the codec frame follows."""
MAGIC = b"EBLM"

T = TypeVar("T")


class PeerError(TrainingError):
    """A neighbour rank stopped answering, or sent something that is not the expected message."""


def wait(request: Any, *, timeout: float, what: Callable[[], str], status: Any = None, peer: int | None = None) -> Any:
    """Wait for an MPI request with a deadline; polls with a short sleep so an idle rank leaves the core free.

    ``what`` describes the awaited message for the error (called only on a failure). A link that
    MPI reports broken (the peer process is gone) is a PeerError naming ``peer``; a message longer
    than the posted buffer re-raises MPI's exception for the caller to explain.
    """
    from mpi4py import MPI

    deadline = time.monotonic() + timeout
    pause = 1e-5
    while True:
        try:
            done = request.Test(status) if status is not None else request.Test()
        except MPI.Exception as exc:
            if exc.Get_error_class() == MPI.ERR_TRUNCATE or peer is None:
                raise
            reason = exc.Get_error_string().splitlines()[0].rstrip(", :")
            raise PeerError(f"{what()}: rank {peer} (block {peer}) died or its link broke (MPI: {reason}); "
                            "hint: completed checkpoints can be resumed with --resume") from exc
        if done:
            return status
        if time.monotonic() > deadline:
            peer_name = f"rank {peer} (block {peer})" if peer is not None else "the peer"
            raise PeerError(f"{what()}: nothing within {timeout:g} s; {peer_name} has died or hangs; hint: check its "
                            "log; completed checkpoints can be resumed with --resume (--peer-timeout sets the limit)")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


class FrameSender:
    """Sends frames to one peer; at most ``depth`` unmatched sends at a time (then it waits for the oldest)."""

    def __init__(self, comm: Any, *, rank: int, peer: int, tag: int, depth: int, timeout: float, describe: str) -> None:
        self.comm, self.rank, self.peer, self.tag = comm, rank, peer, tag
        self.depth, self.timeout, self.describe = depth, timeout, describe
        self._pending: deque[tuple[Any, np.ndarray, int]] = deque()

    def send(self, frame: bytes, step: int) -> None:
        """Send ``frame`` as the message of ``step``, copied behind the envelope (``send_written`` saves the copy)."""
        frame_bytes = np.frombuffer(frame, np.uint8)

        def copy(buffer: np.ndarray, offset: int) -> np.ndarray:
            buffer[offset:] = frame_bytes
            return frame_bytes

        self.send_written(frame_bytes.size, copy, step)

    def send_written(self, capacity: int, write: Callable[[np.ndarray, int], Sized], step: int) -> int:
        """Send, as the message of ``step``, the frame that ``write(buffer, offset)`` writes behind the envelope (at
        most ``capacity`` bytes) and returns: with ``lambda out, offset: codec.encode(message, out=out, offset=offset)``
        the frame is encoded where MPI sends it from, never copied. Once ``depth`` frames wait, it first waits for the
        oldest; if ``write`` raises, nothing is sent. Returns the frame's bytes (the envelope not counted)."""
        from mpi4py import MPI

        while len(self._pending) >= self.depth:
            self._wait_oldest()
        buffer = np.empty(ENVELOPE.size + capacity, np.uint8)  # np.empty is aligned: so is the frame, 16 bytes in
        ENVELOPE.pack_into(buffer, 0, MAGIC, self.rank, step)
        written = len(write(buffer, ENVELOPE.size))
        message = buffer[: ENVELOPE.size + written]  # only what was written
        request = self.comm.Issend([message, MPI.BYTE], dest=self.peer, tag=self.tag)
        self._pending.append((request, message, step))
        return written

    def _wait_oldest(self) -> None:
        request, _, step = self._pending[0]
        wait(request, timeout=self.timeout, peer=self.peer,
             what=lambda: f"rank {self.rank}: rank {self.peer} did not take the {self.describe} of step {step}")
        self._pending.popleft()

    def flush(self) -> None:
        """Wait until the peer has matched every frame sent (before the run ends)."""
        while self._pending:
            self._wait_oldest()


class FrameReceiver:
    """Receives frames from one peer into ``depth`` pre-posted buffers of ``capacity`` bytes, in order."""

    def __init__(self, comm: Any, *, rank: int, peer: int, tag: int, depth: int, capacity: int, timeout: float,
                 describe: str) -> None:
        self.comm, self.rank, self.peer, self.tag = comm, rank, peer, tag
        self.timeout, self.describe, self.capacity = timeout, describe, ENVELOPE.size + capacity
        # MPI matches receives from one source and tag in the order they were posted: the ring is FIFO.
        self._ring: deque[tuple[Any, np.ndarray]] = deque(self._post(np.empty(self.capacity, np.uint8))
                                                          for _ in range(depth))

    def _post(self, buffer: np.ndarray) -> tuple[Any, np.ndarray]:
        from mpi4py import MPI

        return self.comm.Irecv([buffer, MPI.BYTE], source=self.peer, tag=self.tag), buffer

    def take(self, step: int, read: Callable[[memoryview], T]) -> T:
        """Wait for the message of ``step`` and return ``read(frame)``; the buffer is reposted afterwards.

        Raises PeerError when the envelope is not from the expected peer and step, or the frame
        is larger than any message this link can carry.
        """
        from mpi4py import MPI

        request, buffer = self._ring.popleft()
        status = MPI.Status()
        where = f"rank {self.rank}: the {self.describe} from rank {self.peer} for step {step}"
        try:
            wait(request, timeout=self.timeout, what=lambda: where, status=status, peer=self.peer)
        except MPI.Exception as exc:  # a message longer than the buffer (MPI_ERR_TRUNCATE)
            self._ring.append(self._post(buffer))
            raise PeerError(f"{where} was rejected: {exc.Get_error_string()}; the largest frame this link takes is "
                            f"{self.capacity - ENVELOPE.size} bytes; hint: every rank must train with the same "
                            "--codec/--granularity and the same export") from exc
        try:
            count = status.Get_count(MPI.BYTE)
            if count < ENVELOPE.size:
                raise PeerError(f"{where} was rejected: {count} bytes, shorter than the {ENVELOPE.size}-byte envelope")
            magic, sender, sent_step = ENVELOPE.unpack_from(buffer, 0)
            if magic != MAGIC or sender != self.peer or sent_step != step:
                raise PeerError(f"{where} was rejected: its envelope says magic {magic!r}, rank {sender}, step "
                                f"{sent_step} (expected {MAGIC!r}, rank {self.peer}, step {step}); it was not fed "
                                "to the block")
            return read(memoryview(buffer)[ENVELOPE.size:count])
        finally:
            self._ring.append(self._post(buffer))

    def cancel(self) -> None:
        """Cancel the receives still posted (the run is over; no more messages come)."""
        for request, _ in self._ring:
            request.Cancel()
            request.Wait()
        self._ring.clear()
