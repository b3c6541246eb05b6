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

    forward_step, encode, send = worker.Worker._forward_step, stage.Stage.encode, FrameSender.send

    def _forward_step(self, step, prior):  # noqa: ANN001, ANN202
        if _at("kill", self.rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _at("hang", self.rank, step):
            time.sleep(3600)
        return forward_step(self, step, prior)

    def _encode(self, message, step, feedback):  # noqa: ANN001, ANN202
        if not feedback and _at("reshape", self.index, step):
            message = message[:-1]
        return encode(self, message, step, feedback)

    def _send(self, frame, step):  # noqa: ANN001, ANN202
        if self.tag == rank_io.ACTIVATION_TAG and _at("corrupt", self.rank, step):
            damaged = bytearray(frame)
            damaged[len(damaged) // 2] ^= 0xFF
            frame = bytes(damaged)
        if self.tag == rank_io.ACTIVATION_TAG and _at("misstep", self.rank, step):
            step += 1
        return send(self, frame, step)

    worker.Worker._forward_step, stage.Stage.encode, FrameSender.send = _forward_step, _encode, _send
