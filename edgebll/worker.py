"""``edgebll worker``: one block per MPI rank, pipelined, with quantized messages and resumable checkpoints.

Rank k is one :class:`~edgebll.stage.Stage` (block k and, for BLL, its feedback block: both live
on the same device), the same per-block step the in-process runtime runs K of, on MPI links
instead of local ones. Rank 0 reads the data and broadcasts the labels once; every rank computes
each epoch's sample order from (seed, epoch), so no index ever travels (:mod:`edgebll.rank_io`).
Activations go up and BLL's beta messages go down as codec frames through :mod:`edgebll.links`;
the checkpoint bookkeeping travels beside them (:mod:`edgebll.rank_control`).

The schedule. Each block takes its local step as soon as its input arrives: block k works on
step t while block k+1 works on t-1, and no block waits for anything from above except BLL's
feedback messages, which depend only on the labels. So the feedback pass runs *ahead* of the
forward pass: rank k computes the feedback of step t + 2k + 1 before its forward step t (the
lookahead it needs so that beta, travelling down one rank per step, is there in time). Every
block therefore sees exactly the inputs it would see in the single-process runtime: no message
is stale, and the weights equal the in-process run's (a test checks it). ``--sync`` runs
lock-step instead (no lookahead, a barrier after every step): the same result, without overlap.

Checkpoints. At every checkpoint step (each ``--checkpoint-every`` steps and each epoch end) a
rank saves its blocks atomically, keeps a hard-linked copy per step under
``trained/history/step-N``, and tells rank 0, which writes ``progress.json`` (the last step
every rank has saved) and lets the ranks drop older copies. The feedback lookahead stops at the
next checkpoint step, so a checkpoint is a state every rank can restart from. ``--resume``
restores every block to the step in ``progress.json``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgebll.augment import check_cutout, cutout
from edgebll.batching import epoch_order, full_batches
from edgebll.errors import EdgeBLLError, ManifestError
from edgebll.links import wait
from edgebll.json_files import write_json_atomic
from edgebll.manifest import load_block_manifest
from edgebll.run_folder import FEEDBACK_DIR, block_dir_name, load_run_config
from edgebll.metrics import count_correct
from edgebll.backends import Runner, open_block
from edgebll.checkpoints import (
    PROGRESS_NAME, TRAINED_DIR, check_disk_room, checkpoint_bytes, clear_trained,
    prune_history, read_progress, remove_leftovers, restore_step, save_blocks, saved_step,
)
from edgebll.runtime import TRAIN_NAME
from edgebll.rank_control import RankControl
from edgebll.rank_io import broadcast_labels, open_links
from edgebll.stage import Stage, StageState, train_summary
from edgebll.train_config import TrainConfig, WorkerConfig, encode_message
from edgebll.validation import eval_side

RANKS_DIR = "ranks"
"""``RUN/ranks/rank-K.json``: pid and host of each rank, so a launcher can name a rank that died."""


def registered_ranks(run_dir: Path) -> dict[int, dict[str, Any]]:
    """What each rank wrote at start-up (``rank``, ``block``, ``pid``, ``host``), by rank.

    The files are written atomically; one that cannot be read yet (a rank still starting, a
    stale folder) is left out rather than failing the caller, who is explaining another failure.
    """
    found = {}
    for path in (run_dir / RANKS_DIR).glob("rank-*[0-9].json"):
        try:
            info = json.loads(path.read_text())
            found[int(info["rank"])] = info
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


class Worker:
    """The part of a distributed run that one rank executes: its block (and feedback block)."""

    def __init__(self, run_dir: str | os.PathLike, comm: Any, train: TrainConfig, worker: WorkerConfig, *,
                 threads: int = 0, data_dir: str | None = None, restart: bool = False, progress: bool = True,
                 backend: str = "auto", provider: str = "cpu") -> None:
        self.run_dir, self.comm, self.train, self.worker = Path(run_dir), comm, train, worker
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.threads, self.data_dir, self.restart, self.progress = threads, data_dir, restart, progress
        self.backend, self.provider = backend, provider
        self.config = load_run_config(run_dir)
        self.blocks = self.config.blocks
        self.is_bll = self.config.is_bll
        self.batch = self.config.batch_size
        self.train.validate()
        self.train.check_frozen(self.config.blocks)
        self.worker.validate()
        self._check_size()
        self._register()
        self.start = start = self._resume_step()  # 0, or the checkpoint --resume continues from
        state = self._prepare_checkpoints(start)
        self.runner, self.feedback_runner = self._load_runners()
        remove_leftovers(self._runner_dirs(), self.run_dir if self.rank == 0 else None)
        check_disk_room(self.run_dir, sum(checkpoint_bytes(r.manifest, r.block_dir) for r in self._own_runners))
        if self.runner.progress["step"] != start:
            raise ManifestError(f"{self.name}: the checkpoint holds step {self.runner.progress['step']}, expected "
                                f"{start}; hint: --restart")
        manifests = [self.runner.manifest, load_block_manifest(self.run_dir / block_dir_name(self.blocks - 1),
                                                               verify_files=False)] if self.rank == 0 else []
        self.data = broadcast_labels(self.comm, train=self.train, data_dir=self.data_dir,
                                     dataset=self.config.data, manifests=manifests)
        if self.data.inputs is not None:
            check_cutout(self.train.cutout, self.data.inputs.shape, self.config.model)
        self.steps_per_epoch = full_batches(len(self.data.labels), self.batch)
        self.total = self.steps_per_epoch * self.train.epochs
        self.base_lr = float(self.train.lr if self.train.lr is not None else self.config.lr)
        self._order_epoch, self._order, self._picked = -1, np.empty(0, np.int64), np.empty(0, np.int64)
        self.links = open_links(self.comm, blocks=self.blocks, batch=self.batch, train=self.train,
                                depth=self.worker.max_in_flight, timeout=self.worker.peer_timeout, runner=self.runner,
                                feedback=self.feedback_runner, validation=self.data.val_labels is not None)
        self.stage = Stage(self.runner, self.feedback_runner, train=self.train,
                           num_classes=int(self.config.num_classes or 0), total=self.total,
                           steps_per_epoch=self.steps_per_epoch, base_lr=self.base_lr, state=state,
                           name=self.name, up_in=self.links.up_recv, up_out=self.links.up_send,
                           down_in=self.links.down_recv, down_out=self.links.down_send)
        self.control = RankControl(self.comm, run_dir=self.run_dir, marked=start, total=self.total,
                                   steps_per_epoch=self.steps_per_epoch, timeout=self.worker.peer_timeout,
                                   name=self.name, prune=self._prune)

    # ----------------------------------------------------------------------------------- setup
    @property
    def name(self) -> str:
        return f"rank {self.rank} (block {self.rank})"

    def _block_dir(self, feedback: bool = False) -> Path:
        folder = self.run_dir / block_dir_name(self.rank)
        return folder / FEEDBACK_DIR if feedback else folder

    @property
    def has_feedback(self) -> bool:
        return self.is_bll and self.rank < self.blocks - 1

    def _check_size(self) -> None:
        if self.size != self.blocks:
            raise EdgeBLLError(f"{self.run_dir} has {self.blocks} blocks but mpiexec started {self.size} ranks; each "
                               f"rank trains one block: start exactly {self.blocks} (mpiexec -n {self.blocks}); "
                               "hint: re-export with --blocks N to use N devices")

    def _register(self) -> None:
        folder = self.run_dir / RANKS_DIR
        folder.mkdir(exist_ok=True)
        info = {"rank": self.rank, "block": self.rank, "pid": os.getpid(), "host": socket.gethostname()}
        write_json_atomic(folder / f"rank-{self.rank}.json", json.dumps(info))
        print(f"edgebll worker: {self.name}: pid {info['pid']} on {info['host']}", file=sys.stderr, flush=True)

    def _resume_step(self) -> int:
        """Rank 0 reads the marker; every rank learns the step to start from."""
        step = 0
        if self.rank == 0 and self.train.resume and not self.restart:
            progress = read_progress(self.run_dir)
            step = progress["step"] if progress is not None else 0
        return int(self.comm.bcast(step, root=0))

    def _runner_dirs(self) -> list[Path]:
        return [self._block_dir()] + ([self._block_dir(feedback=True)] if self.has_feedback else [])

    def _prepare_checkpoints(self, start: int) -> StageState:
        """Put every block of this rank at step ``start``: restore that step's checkpoint, or refuse."""
        if self.restart:
            clear_trained(self._runner_dirs(), self.run_dir if self.rank == 0 else None)
            return StageState()
        if start == 0:
            trained = [f for f in self._runner_dirs() if saved_step(f) is not None]
            if trained and not self.train.resume:
                raise EdgeBLLError(f"{self.name}: {trained[0]} already holds trained weights ({TRAINED_DIR}/); hint: "
                                   "pass --resume to continue, or --restart to start over")
            if trained:  # never delete weights that a user may want: they can only say so with --restart
                raise EdgeBLLError(f"{self.name}: --resume finds no {PROGRESS_NAME} in {self.run_dir}, so no step was "
                                   f"saved by every block, but {trained[0]} holds trained weights (from a run that "
                                   "stopped before its first common checkpoint); hint: --restart to start over")
            return StageState()
        restore_step(self._runner_dirs(), start, saved_step)
        return StageState.at(self._block_dir(), start)  # the same totals whichever transport saved them

    def _load_runners(self) -> tuple[Runner, Runner | None]:
        load = dict(threads=self.threads, backend=self.backend, provider=self.provider)
        runner = open_block(self._block_dir(), frozen=self.rank in self.train.freeze_blocks, **load)
        if runner.index != self.rank or runner.manifest.num_blocks != self.blocks:
            raise ManifestError(f"{self.name}: {self._block_dir()} holds block {runner.index} of "
                                f"{runner.manifest.num_blocks}; hint: re-export all blocks together")
        if runner.manifest.batch_size != self.batch:
            raise ManifestError(f"{self.name}: run.json's batch_size {self.batch} differs from {self._block_dir()}'s "
                                f"{runner.manifest.batch_size}; the run was edited or mixed from two exports; hint: "
                                "re-export the run")
        feedback = open_block(self._block_dir(feedback=True), **load) if self.has_feedback else None
        return runner, feedback

    # ----------------------------------------------------------------------------------- steps
    def _step_labels(self, step: int) -> np.ndarray:
        epoch, batch = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(len(self.data.labels), self.train.seed, epoch), epoch
        self._picked = self._order[batch * self.batch:(batch + 1) * self.batch]
        return self.data.labels[self._picked]

    def _feedback_step(self, step: int) -> np.ndarray:
        """Train this rank's feedback block on ``step``; send beta down; return the prior b_k of that step."""
        return self.stage.feedback_step(step, self._step_labels(step))

    def _forward_step(self, step: int, prior: np.ndarray | None) -> None:
        labels = self._step_labels(step)
        x = None
        if self.rank == 0:
            assert self.data.inputs is not None
            x = self.data.inputs[self._picked]
            if self.train.cutout:  # as the in-process runtime does: seeded by (seed, step), so a resume repeats it
                x = cutout(x, self.train.cutout, seed=self.train.seed, step=step)
        self.stage.forward_step(step, labels, x=x, prior=prior)

    # ----------------------------------------------------------------------------------- validation
    def _validate(self, epoch: int) -> None:
        """This rank's block on the validation split after ``epoch``, as the in-process runtime counts it.

        The forward chain's eval graphs alone (a BLL prior is zero), batch by batch: rank k takes
        rank k-1's codec frame, counts its block's correct labels and sends its message on. The
        frames are those of the in-process validation (step -1: no stochastic rounding), on links
        of their own, so they never mix with training frames; their envelopes number the batches
        across epochs. The counts travel in the rank's state.
        """
        val_labels = self.data.val_labels
        assert val_labels is not None
        eval_codec = TrainConfig(codec=self.train.codec, granularity=self.train.granularity,
                                 group_size=self.train.group_size)
        batches = -(-len(val_labels) // self.batch)
        correct = loss = 0.0
        labelled = 0
        for i, first in enumerate(range(0, len(val_labels), self.batch)):
            labels = val_labels[first:first + self.batch]
            number = epoch * batches + i
            if self.links.val_recv is None:
                assert self.data.val_inputs is not None
                x = self.data.val_inputs[first:first + self.batch]
            else:
                x = self.stage.receive(self.links.val_recv, number, self.runner, len(labels))
            result = self.runner.eval_step(x, eval_side(self.runner, labels))
            correct += count_correct(result.logits, labels)
            labelled += labels.size
            loss += result.loss * len(labels)
            if self.links.val_send is not None:
                assert result.message is not None
                frame = encode_message(result.message, eval_codec, -1, self.rank, sender=self.name)
                self.links.val_send.send(frame, number)
        self.stage.state.validation[epoch] = [correct, labelled, loss, len(val_labels)]

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def _own_runners(self) -> list[Runner]:
        """The blocks this rank trains: its forward block, and its feedback block where it has one."""
        return [self.runner] + ([self.feedback_runner] if self.feedback_runner is not None else [])

    def _checkpoint(self, step: int) -> None:
        """Save every block of this rank after ``step`` steps, keep a per-step copy, tell rank 0."""
        save_blocks(self._own_runners, step=step, epoch=step // self.steps_per_epoch, run_dir=self.run_dir,
                    extra=self.stage.kept_totals(step))
        self.control.saved(step)

    def _prune(self, below: int) -> None:
        prune_history([r.block_dir for r in self._own_runners], below)

    # ----------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any] | None:
        """Train this rank's block(s) to the end; rank 0 writes and returns train.json's content."""
        start = self.start
        began = time.perf_counter()
        self._train_loop(start)
        elapsed = time.perf_counter() - began
        self.links.flush()
        self.control.finished({"seconds": elapsed, "steps": self.total - start, "state": self.stage.state.to_json(),
                               "link_buffer_bytes": self.links.buffer_bytes})
        summary = self._finish(start) if self.rank == 0 else None
        self.control.drain()
        self.links.cancel()
        return summary

    def _checkpoint_steps(self) -> set[int]:
        every = self.train.checkpoint_every
        steps = {e * self.steps_per_epoch for e in range(1, self.train.epochs + 1)}
        if every:
            steps |= set(range(every, self.total + 1, every))
        return steps

    def _train_loop(self, start: int) -> None:
        checkpoints = sorted(s for s in self._checkpoint_steps() if s > start)
        lookahead = self.worker.lookahead(self.rank)
        priors: dict[int, np.ndarray] = {}
        next_feedback = start
        bar = tqdm(total=self.total, initial=start, desc=f"train (rank {self.rank} of {self.size})", unit="step",
                   disable=not self.progress or self.rank != self.size - 1)
        for step in range(start, self.total):
            stepped = time.perf_counter()
            if self.feedback_runner is not None:
                # run ahead, but never past the next checkpoint: a checkpoint must be a common state
                limit = min(step + lookahead, next((c for c in checkpoints if c > step), self.total) - 1)
                while next_feedback <= limit:
                    priors[next_feedback] = self._feedback_step(next_feedback)
                    next_feedback += 1
            self._forward_step(step, priors.pop(step, None))
            self.stage.state.epoch(step // self.steps_per_epoch).seconds += time.perf_counter() - stepped
            if self.data.val_labels is not None and (step + 1) % self.steps_per_epoch == 0:
                self._validate((step + 1) // self.steps_per_epoch - 1)
            if step + 1 in checkpoints:
                self._checkpoint(step + 1)
            self.control.poll()
            if self.worker.sync:
                wait(self.comm.Ibarrier(), timeout=self.worker.peer_timeout,
                     what=lambda: f"{self.name}: the other ranks at the end of step {step}")
            bar.update()
            if self.rank == self.size - 1:
                sums = self.stage.state.epoch(step // self.steps_per_epoch)
                bar.set_postfix(loss=f"{sums.loss / sums.samples:.3f}", acc=f"{sums.correct / max(sums.labelled, 1):.3f}")
        bar.close()

    def _finish(self, start: int) -> dict[str, Any]:
        """Rank 0: collect every rank's totals and write train.json (as the in-process runtime does)."""
        reports = self.control.reports()
        # every rank's totals cover all epochs, those before a resume too (they travel in its checkpoints)
        states = [StageState.from_json(r["state"]) for r in reports]
        wall = max(float(r["seconds"]) for r in reports)
        summary = train_summary(states, run_config=self.config, train=self.train, base_lr=self.base_lr,
                                batch=self.batch, total=self.total, start=start, seconds=wall, transport="mpi",
                                ranks=self.size, config_extra=asdict(self.worker))
        summary["schedule"] = "sync" if self.worker.sync else "pipelined"
        summary["link_buffer_bytes_per_rank"] = [int(r["link_buffer_bytes"]) for r in reports]
        write_json_atomic(self.run_dir / TRAIN_NAME, json.dumps(summary, indent=1))
        return summary
