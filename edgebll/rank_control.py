"""The small bookkeeping messages between MPI ranks: which step each rank has saved, and its results.

Every rank tells rank 0 when it has saved a checkpoint step. When all have, rank 0 writes
``progress.json`` (the run's commit record: :func:`edgebll.checkpoints.mark_step`) and tells the
others, and every rank drops its older copies. At the end each rank sends rank 0 its totals
(:class:`edgebll.stage.StageState`), from which rank 0 writes train.json. The messages are
pickled dicts of numbers, never tensors; they travel on a tag of their own, beside the links.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgebll.checkpoints import mark_step
from edgebll.links import PeerError, wait

CONTROL_TAG, MARK_TAG = 13, 14


class RankControl:
    """One rank's end of the control messages (rank 0 also keeps the others' reports)."""

    def __init__(self, comm: Any, *, run_dir: Path, marked: int, total: int, steps_per_epoch: int, timeout: float,
                 name: str, prune: Callable[[int], None]) -> None:
        self.comm, self.run_dir, self.total, self.steps_per_epoch = comm, run_dir, total, steps_per_epoch
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout, self.name, self.prune = timeout, name, prune
        self.marked = marked
        """The last step ``progress.json`` records (every rank has saved it)."""
        self.done: dict[int, dict[str, Any]] = {}
        """Rank 0: each rank's final report, by rank."""
        self._saved: dict[int, set[int]] = {}
        self._sends: list[Any] = []
        self._post()

    def saved(self, step: int) -> None:
        """This rank has saved ``step``."""
        self._send({"kind": "saved", "rank": self.rank, "step": step})

    def finished(self, report: dict[str, Any]) -> None:
        """This rank's final report (its totals, seconds, link buffer bytes) for rank 0."""
        self._send({"kind": "done", "rank": self.rank} | report)

    def poll(self) -> None:
        """Handle the control messages that have arrived (rank 0: saves and reports; the others: marks)."""
        while True:
            done, message = self._recv.test()
            if not done:
                break
            self._post()
            if self.rank == 0:
                self._on_message(message)
            else:
                self.marked = int(message)
                self.prune(self.marked)
        self._sends = [r for r in self._sends if not r.Test()]

    def reports(self) -> list[dict[str, Any]]:
        """Rank 0: every rank's final report, in rank order, waiting up to the peer timeout for them."""
        deadline = time.monotonic() + self.timeout
        while len(self.done) < self.size:
            self.poll()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.size)) - set(self.done))
                raise PeerError(f"{self.name}: no results from rank(s) {missing} within {self.timeout:g} s")
            time.sleep(1e-3)
        return [self.done[r] for r in range(self.size)]

    def drain(self) -> None:
        """Wait until every send is matched and the last step is marked, then close the receive."""
        deadline = time.monotonic() + self.timeout
        # every rank waits for the last mark: then no control message is left unmatched
        while self._sends or self.marked < self.total:
            self.poll()
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: control messages still pending after {self.timeout:g} s")
            time.sleep(1e-3)
        wait(self.comm.Ibarrier(), timeout=self.timeout, what=lambda: f"{self.name}: the final barrier")
        self._recv.Cancel()
        self._recv.Wait()  # a cancelled request must still complete, or MPI_Finalize complains

    def _send(self, message: dict[str, Any]) -> None:
        if self.rank == 0:
            self._on_message(message)
        else:
            self._sends.append(self.comm.isend(message, dest=0, tag=CONTROL_TAG))

    def _on_message(self, message: dict[str, Any]) -> None:
        if message["kind"] == "saved":
            saved = self._saved.setdefault(message["step"], set())
            saved.add(message["rank"])
            if len(saved) == self.size:
                self._mark(message["step"])
        elif message["kind"] == "done":
            self.done[message["rank"]] = message

    def _mark(self, step: int) -> None:
        mark_step(self.run_dir, {"step": step, "epoch": step // self.steps_per_epoch, "transport": "mpi",
                                 "ranks": self.size, "total_steps": self.total})
        self.marked = step
        for rank in range(1, self.size):
            self._sends.append(self.comm.isend(step, dest=rank, tag=MARK_TAG))
        self.prune(step)

    def _post(self) -> None:
        """The next control receive: rank 0 hears saves and reports from anyone, the others marks from rank 0."""
        from mpi4py import MPI  # the device runtime runs without mpi4py unless a run uses MPI

        self._recv = self.comm.irecv(source=MPI.ANY_SOURCE if self.rank == 0 else 0,
                                     tag=CONTROL_TAG if self.rank == 0 else MARK_TAG)
