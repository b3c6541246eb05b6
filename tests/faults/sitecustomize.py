"""Fault injection for the MPI tests, loaded into every rank (this folder on PYTHONPATH) and only there.

``EDGEBLL_INJECT_FAULT=KIND:RANK:STEP`` makes rank RANK, at step STEP: ``kill`` itself (SIGKILL),
``hang`` (alive but silent, like a board whose network dropped), or send its activation ``corrupt``
(one byte flipped), under an envelope that claims the next step (``misstep``), or one sample short
(``reshape``). Production code has no hook for any of this: the worker's and stage's methods are wrapped here.
"""

from __future__ import annotations

import os

SPEC = os.environ.get("EDGEBLL_INJECT_FAULT", "")

if SPEC:
    import signal
    import time

    from edgebll import rank_io, stage, worker
    from edgebll.links import FrameSender

    KIND, RANK, STEP = SPEC.split(":")[0], int(SPEC.split(":")[1]), int(SPEC.split(":")[2])

    def _at(kind: str, rank: int, step: int) -> bool:
        return (KIND, RANK, STEP) == (kind, rank, step)

    forward_step, encode, send_written = worker.Worker._forward_step, stage.Stage.encode, FrameSender.send_written

    def _forward_step(self, step, prior):  # noqa: ANN001, ANN202
        if _at("kill", self.rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _at("hang", self.rank, step):
            time.sleep(3600)
        return forward_step(self, step, prior)

    def _encode(self, message, step, feedback, out=None, offset=0):  # noqa: ANN001, ANN202
        if not feedback and _at("reshape", self.index, step):
            message = message[:-1]
        return encode(self, message, step, feedback, out, offset)

    def _send_written(self, capacity, write, step):  # noqa: ANN001, ANN202
        activation = self.tag == rank_io.ACTIVATION_TAG

        def damaged(buffer, offset):  # noqa: ANN001, ANN202
            written = write(buffer, offset)
            buffer[offset + len(written) // 2] ^= 0xFF
            return written

        corrupt = activation and _at("corrupt", self.rank, step)
        if activation and _at("misstep", self.rank, step):
            step += 1
        return send_written(self, capacity, damaged if corrupt else write, step)

    worker.Worker._forward_step, stage.Stage.encode, FrameSender.send_written = _forward_step, _encode, _send_written
