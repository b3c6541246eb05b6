"""``edgebll worker``: one block per MPI rank, pipelined, with quantized messages and resumable checkpoints.

Rank k trains block k (and, for BLL, its feedback block: both live on the same device). Rank 0
reads the data and broadcasts the labels once; every rank computes each epoch's sample order
from (seed, epoch), so no index ever travels. Activations go up and BLL's beta messages go down
as codec frames through :mod:`edgebll.links`.

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
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgebll import codec as message_codec
from edgebll.augment import check_cutout, cutout
from edgebll.data import epoch_order, full_batches
from edgebll.errors import CodecError, EdgeBLLError, ManifestError
from edgebll.links import ENVELOPE, FrameReceiver, FrameSender, PeerError, wait
from edgebll.manifest import FEEDBACK_DIR, block_dir_name, load_block_manifest, load_run_config, write_json_atomic
from edgebll.metrics import count_correct
from edgebll.options import option
from edgebll.backends import Runner, open_block
from edgebll.checkpoints import (
    PROGRESS_NAME, TRAINED_DIR, check_disk_room, checkpoint_bytes, clear_trained, history_dir, mark_step,
    prune_history, read_progress, remove_leftovers, restore_step, save_blocks, saved_step,
)
from edgebll.runtime import TRAIN_NAME, TrainConfig, encode_message, mix_weight
from edgebll.schedule import learning_rate
from edgebll.validation import check_data_fits, eval_side, training_data

RANKS_DIR = "ranks"
"""``RUN/ranks/rank-K.json``: pid and host of each rank, so a launcher can name a rank that died."""


WORKER_STATE = "worker.json"

_ACTIVATION, _FEEDBACK, _CONTROL, _MARK, _VALIDATION = 11, 12, 13, 14, 15


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


@dataclass(kw_only=True, slots=True)
class WorkerConfig:
    """How the ranks talk to each other."""

    sync: bool = option(False, "mpi: lock-step, every rank finishes a step before any starts the next (no "
                        "pipelining; the same weights, slower)")
    max_in_flight: int = option(4, "mpi: frames per link that may wait for the receiving rank before the sender "
                                "waits (back-pressure; memory = N x frame size)", metavar="N")
    peer_timeout: float = option(120.0, "mpi: how long a rank waits for a neighbour before it names it as dead and "
                                 "the run stops", metavar="SECONDS")
    feedback_lookahead: int | None = option(None, "mpi, bll: steps rank k's feedback pass may run ahead of its "
                                            "forward pass (none: 2k+1, the least with which no rank waits; beta "
                                            "messages are never stale either way)", metavar="STEPS", parse=int)

    def lookahead(self, rank: int) -> int:
        if self.sync:
            return 0
        return 2 * rank + 1 if self.feedback_lookahead is None else self.feedback_lookahead

    def validate(self) -> None:
        if self.feedback_lookahead is not None and self.feedback_lookahead < 0:
            raise EdgeBLLError(f"--feedback-lookahead must be >= 0, got {self.feedback_lookahead}")
        if self.max_in_flight < 1:
            raise EdgeBLLError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if not (math.isfinite(self.peer_timeout) and self.peer_timeout > 0):
            raise EdgeBLLError(f"--peer-timeout must be a finite number of seconds > 0, got {self.peer_timeout}")


@dataclass(slots=True)
class _EpochSums:
    """One rank's running totals for one epoch (kept in every checkpoint, so a resumed epoch counts on)."""

    loss: float = 0.0
    correct: int = 0
    metric: float = 0.0
    feedback_loss: float = 0.0
    samples: int = 0
    feedback_samples: int = 0
    labelled: int = 0
    """Labels counted for the accuracy: one per sample (images), one per token (the sequence task)."""


@dataclass(slots=True)
class _RankState:
    """What a rank must restore to go on from a checkpoint step."""

    step: int = 0
    sums: dict[int, _EpochSums] = field(default_factory=dict)
    up_bytes: int = 0
    down_bytes: int = 0
    validation: dict[int, list[float]] = field(default_factory=dict)
    """Per epoch, this rank's block on the validation split: [correct, labelled, loss sum, samples]."""

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "up_bytes": self.up_bytes, "down_bytes": self.down_bytes,
                           "sums": {str(e): asdict(s) for e, s in self.sums.items()},
                           "validation": {str(e): v for e, v in self.validation.items()}})

    @classmethod
    def from_json(cls, text: str) -> _RankState:
        data = json.loads(text)
        return cls(int(data["step"]), {int(e): _EpochSums(**s) for e, s in data["sums"].items()},
                   int(data["up_bytes"]), int(data["down_bytes"]),
                   {int(e): v for e, v in data.get("validation", {}).items()})  # runs before --val-split over MPI


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
        self.blocks = int(self.config["blocks"])
        self.is_bll = self.config["method"] == "bll"
        self.batch = int(self.config["batch_size"])

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

    def _prepare_checkpoints(self, start: int) -> _RankState:
        """Put every block of this rank at step ``start``: restore that step's checkpoint, or refuse."""
        if self.restart:
            clear_trained(self._runner_dirs(), self.run_dir if self.rank == 0 else None)
            return _RankState()
        if start == 0:
            trained = [f for f in self._runner_dirs() if saved_step(f) is not None]
            if trained and not self.train.resume:
                raise EdgeBLLError(f"{self.name}: {trained[0]} already holds trained weights ({TRAINED_DIR}/); hint: "
                                   "pass --resume to continue, or --restart to start over")
            if trained:  # never delete weights that a user may want: they can only say so with --restart
                raise EdgeBLLError(f"{self.name}: --resume finds no {PROGRESS_NAME} in {self.run_dir}, so no step was "
                                   f"saved by every block, but {trained[0]} holds trained weights (from a run that "
                                   "stopped before its first common checkpoint); hint: --restart to start over")
            return _RankState()
        restore_step(self._runner_dirs(), start, saved_step)
        totals = history_dir(self._block_dir(), start) / WORKER_STATE
        # a run checkpointed in one process has no rank totals: its resumed train.json counts from here
        return _RankState.from_json(totals.read_text()) if totals.is_file() else _RankState(step=start)

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

    def _labels(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Rank 0 loads run.json's dataset and broadcasts the labels; returns (labels, inputs on rank 0 else None).

        With ``--val-split`` rank 0 splits it as the in-process runtime does, and every rank also gets
        the validation labels (``self.val_labels``; rank 0 keeps the images in ``self.val_inputs``).
        """
        inputs = labels = self.val_inputs = val_labels = None
        counts, label_shape = (0, 0), ()
        error = None
        if self.rank == 0:
            try:
                data, validation = training_data(None, self.data_dir, self.train.limit, self.train.val_split,
                                                 self.config.get("data"))
                last = load_block_manifest(self.run_dir / block_dir_name(self.blocks - 1), verify_files=False)
                check_data_fits(data, [self.runner.manifest, last], "training data")
                inputs, labels = data.arrays()
                if validation is not None:
                    self.val_inputs, val_labels = validation.arrays()
                counts = (len(data), len(validation) if validation is not None else 0)
                label_shape = labels.shape[1:]  # [N] per image, [N, T] per token
            except EdgeBLLError as exc:
                error = str(exc)
        counts, label_shape, error = self.comm.bcast((counts, label_shape, error), root=0)
        if error is not None:
            raise EdgeBLLError(f"rank 0 cannot load the training data: {error}")
        if labels is None:
            labels = np.empty((counts[0], *label_shape), np.int64)
        self.comm.Bcast(labels, root=0)
        if counts[1]:
            if val_labels is None:
                val_labels = np.empty((counts[1], *label_shape), np.int64)
            self.comm.Bcast(val_labels, root=0)
        self.val_labels = val_labels
        return labels, inputs

    def _links(self, runner: Runner, feedback: Runner | None) -> None:
        depth, timeout = self.worker.max_in_flight, self.worker.peer_timeout
        options = dict(granularity=self.train.granularity, group_size=self.train.group_size)
        self.up_send = self.up_recv = self.down_send = self.down_recv = None
        common = dict(rank=self.rank, depth=depth, timeout=timeout)
        if self.rank > 0:
            shape = [self.batch, *runner.manifest.inputs[0].per_sample_shape()]
            self.up_recv = FrameReceiver(self.comm, peer=self.rank - 1, tag=_ACTIVATION, describe="activation",
                                         capacity=message_codec.frame_nbytes(shape, self.train.codec, **options),
                                         **common)
        if self.rank < self.blocks - 1:
            self.up_send = FrameSender(self.comm, peer=self.rank + 1, tag=_ACTIVATION, describe="activation", **common)
        if feedback is not None and self.rank < self.blocks - 2:
            shape = [self.batch, *feedback.manifest.inputs[0].per_sample_shape()]
            self.down_recv = FrameReceiver(self.comm, peer=self.rank + 1, tag=_FEEDBACK, describe="beta message",
                                           capacity=message_codec.frame_nbytes(shape, self.train.codec, **options),
                                           **common)
        if feedback is not None and self.rank > 0:
            self.down_send = FrameSender(self.comm, peer=self.rank - 1, tag=_FEEDBACK, describe="beta message",
                                         **common)
        # --val-split: the held-out batches go up on links of their own (never counted as training traffic)
        self.val_send = self.val_recv = None
        if self.val_labels is not None:
            if self.rank > 0:
                shape = [self.batch, *runner.manifest.inputs[0].per_sample_shape()]
                self.val_recv = FrameReceiver(self.comm, peer=self.rank - 1, tag=_VALIDATION,
                                              describe="validation activation", **common,
                                              capacity=message_codec.frame_nbytes(shape, self.train.codec, **options))
            if self.rank < self.blocks - 1:
                self.val_send = FrameSender(self.comm, peer=self.rank + 1, tag=_VALIDATION,
                                            describe="validation activation", **common)

        def sent(spec: Any) -> int:
            return ENVELOPE.size + message_codec.frame_nbytes([self.batch, *spec.per_sample_shape()], self.train.codec,
                                                              **options)

        # what the links hold at most: depth frames on each side of each link, the validation rings
        # included (counted in train.json; memory.estimate_peak_bytes(in_flight=depth, validation=...))
        receivers = (self.up_recv, self.down_recv, self.val_recv)
        self.link_buffer_bytes = sum(depth * r.capacity for r in receivers if r is not None)
        up = runner.manifest.output("message")
        senders = ((self.up_send, up), (self.val_send, up),
                   (self.down_send, feedback.manifest.output("message") if feedback else None))
        self.link_buffer_bytes += sum(depth * sent(spec) for link, spec in senders if link is not None and spec is not None)
        self._expected_x = [self.batch, *runner.manifest.inputs[0].per_sample_shape()]
        self._expected_beta = ([self.batch, *feedback.manifest.inputs[0].per_sample_shape()]
                               if feedback is not None else None)

    # ----------------------------------------------------------------------------------- steps
    def _encode(self, message: np.ndarray, step: int, feedback: bool) -> bytes:
        return encode_message(message, self.train, step, self.rank, feedback=feedback, sender=self.name)

    def _receive(self, link: FrameReceiver, step: int, shape: list[int]) -> np.ndarray:
        def read(frame: memoryview) -> np.ndarray:
            try:
                array = message_codec.decode(frame)
            except CodecError as exc:
                raise PeerError(f"{self.name}: rejected the {link.describe} frame from rank {link.peer} for step "
                                f"{step}: {exc}; it was not fed to the block") from exc
            if list(array.shape) != shape:
                raise PeerError(f"{self.name}: rejected the {link.describe} frame from rank {link.peer} for step "
                                f"{step}: shape {list(array.shape)}, but the block takes {shape}; it was not fed to "
                                "the block; hint: re-export all blocks together")
            return array

        return link.take(step, read)

    def _step_labels(self, step: int) -> np.ndarray:
        epoch, batch = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(len(self.labels), self.train.seed, epoch), epoch
        self._picked = self._order[batch * self.batch:(batch + 1) * self.batch]
        return self.labels[self._picked]

    def _lr(self, step: int) -> float:
        return learning_rate(self.train.schedule, self.base_lr, step, self.total, self.train.warmup_steps)

    def _sums(self, step: int) -> _EpochSums:
        return self.state.sums.setdefault(step // self.steps_per_epoch, _EpochSums())

    def _feedback_step(self, step: int) -> np.ndarray:
        """Train this rank's feedback block on ``step``; send beta down; return the prior b_k of that step."""
        assert self.feedback_runner is not None
        labels = self._step_labels(step)
        target = np.eye(int(self.config["num_classes"]), dtype=np.float32)[labels]
        beta = target if self.down_recv is None else self._receive(self.down_recv, step, self._expected_beta)
        result = self.feedback_runner.train_step(beta, target, self._lr(step) * self.train.feedback_lr_scale)
        sums = self._sums(step)
        sums.feedback_loss += result.loss * len(labels)
        sums.feedback_samples += len(labels)
        if self.down_send is not None:
            assert result.message is not None, "feedback blocks send beta down"
            frame = self._encode(result.message, step, feedback=True)
            self.down_send.send(frame, step)
            self.state.down_bytes += len(frame)
        return result.logits

    def _forward_step(self, step: int, prior: np.ndarray | None) -> None:
        labels = self._step_labels(step)
        if self.up_recv is None:
            assert self.inputs is not None
            x = self.inputs[self._picked]
            if self.train.cutout:  # as the in-process runtime does: seeded by (seed, step), so a resume repeats it
                x = cutout(x, self.train.cutout, seed=self.train.seed, step=step)
        else:
            x = self._receive(self.up_recv, step, self._expected_x)
        side = labels if prior is None else (mix_weight(self.train, step, self.total) * prior).astype(np.float32)
        if self.runner.index in self.train.freeze_blocks:
            result = self.runner.frozen_step(x, side)
        else:
            result = self.runner.train_step(x, side, self._lr(step))
        sums = self._sums(step)
        sums.loss += result.loss * len(labels)
        sums.correct += count_correct(result.logits, labels)
        sums.labelled += labels.size
        if result.metric is not None:
            sums.metric += result.metric * len(labels)
        sums.samples += len(labels)
        if self.up_send is not None:
            frame = self._encode(result.message, step, feedback=False)
            self.up_send.send(frame, step)
            self.state.up_bytes += len(frame)

    # ----------------------------------------------------------------------------------- validation
    def _validate(self, epoch: int) -> None:
        """This rank's block on the validation split after ``epoch``, as the in-process runtime counts it.

        The forward chain's eval graphs alone (a BLL prior is zero), batch by batch: rank k takes
        rank k-1's codec frame, counts its block's correct labels and sends its message on. The
        frames are those of the in-process validation (step -1: no stochastic rounding), on links
        of their own, so they never mix with training frames; their envelopes number the batches
        across epochs. The counts travel in the rank's state.
        """
        assert self.val_labels is not None
        eval_codec = TrainConfig(codec=self.train.codec, granularity=self.train.granularity,
                                 group_size=self.train.group_size)
        expected = self.runner.manifest.inputs[0].per_sample_shape()
        batches = -(-len(self.val_labels) // self.batch)
        correct = loss = 0.0
        labelled = 0
        for i, first in enumerate(range(0, len(self.val_labels), self.batch)):
            labels = self.val_labels[first:first + self.batch]
            number = epoch * batches + i
            if self.val_recv is None:
                assert self.val_inputs is not None
                x = self.val_inputs[first:first + self.batch]
            else:
                x = self._receive(self.val_recv, number, [len(labels), *expected])
            result = self.runner.eval_step(x, eval_side(self.runner, labels))
            correct += count_correct(result.logits, labels)
            labelled += labels.size
            loss += result.loss * len(labels)
            if self.val_send is not None:
                assert result.message is not None
                self.val_send.send(encode_message(result.message, eval_codec, -1, self.rank, sender=self.name),
                                   number)
        self.state.validation[epoch] = [correct, labelled, loss, len(self.val_labels)]

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def _own_runners(self) -> list[Runner]:
        """The blocks this rank trains: its forward block, and its feedback block where it has one."""
        return [self.runner] + ([self.feedback_runner] if self.feedback_runner is not None else [])

    def _checkpoint(self, step: int) -> None:
        """Save every block of this rank after ``step`` steps, keep a per-step copy, tell rank 0."""
        self.state.step = step
        save_blocks(self._own_runners, step=step, epoch=step // self.steps_per_epoch, run_dir=self.run_dir,
                    extra={self.runner.block_dir: {WORKER_STATE: self.state.to_json()}})
        self._control({"kind": "saved", "rank": self.rank, "step": step})

    def _prune(self, below: int) -> None:
        prune_history([r.block_dir for r in self._own_runners], below)

    def _control(self, message: dict[str, Any]) -> None:
        """Small bookkeeping messages to rank 0 (pickled dicts of numbers; never tensors)."""
        if self.rank == 0:
            self._on_control(message)
        else:
            self._control_sends.append(self.comm.isend(message, dest=0, tag=_CONTROL))

    def _on_control(self, message: dict[str, Any]) -> None:
        if message["kind"] == "saved":
            saved = self._saved.setdefault(message["step"], set())
            saved.add(message["rank"])
            if len(saved) == self.size:
                self._mark(message["step"])
        elif message["kind"] == "done":
            self._done[message["rank"]] = message

    def _mark(self, step: int) -> None:
        mark_step(self.run_dir, {"step": step, "epoch": step // self.steps_per_epoch, "transport": "mpi",
                                 "ranks": self.size, "total_steps": self.total})
        self._marked = step
        for rank in range(1, self.size):
            self._control_sends.append(self.comm.isend(step, dest=rank, tag=_MARK))
        self._prune(step)

    def _post_control_recv(self) -> None:
        """The next control receive: rank 0 hears saves and results from anyone, the others marks from rank 0."""
        self._control_recv = self.comm.irecv(source=0 if self.rank else _ANY_SOURCE(), tag=_MARK if self.rank
                                             else _CONTROL)

    def _poll(self) -> None:
        """Handle control messages that have arrived (rank 0: saves and results; others: marks)."""
        while True:
            done, message = self._control_recv.test()
            if not done:
                break
            self._post_control_recv()
            if self.rank == 0:
                self._on_control(message)
            else:
                self._marked = int(message)
                self._prune(self._marked)
        self._control_sends = [r for r in self._control_sends if not r.Test()]

    # ----------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any] | None:
        """Train this rank's block(s) to the end; rank 0 writes and returns train.json's content."""
        self.train.validate()
        self.train.check_frozen(int(self.config["blocks"]))
        self.worker.validate()
        self._check_size()
        self._register()
        start = self._resume_step()
        self.state = self._prepare_checkpoints(start)
        self.runner, self.feedback_runner = self._load_runners()
        remove_leftovers(self._runner_dirs(), self.run_dir if self.rank == 0 else None)
        check_disk_room(self.run_dir, sum(checkpoint_bytes(r.manifest, r.block_dir) for r in self._own_runners))
        if self.runner.progress["step"] != start:
            raise ManifestError(f"{self.name}: the checkpoint holds step {self.runner.progress['step']}, expected "
                                f"{start}; hint: --restart")
        self.labels, self.inputs = self._labels()
        if self.inputs is not None:
            check_cutout(self.train.cutout, self.inputs.shape, self.config["model"])
        self.steps_per_epoch = full_batches(len(self.labels), self.batch)
        self.total = self.steps_per_epoch * self.train.epochs
        self.base_lr = float(self.train.lr if self.train.lr is not None else self.config["lr"])
        self._order_epoch = -1
        self._links(self.runner, self.feedback_runner)
        self._control_sends: list[Any] = []
        self._saved: dict[int, set[int]] = {}
        self._done: dict[int, dict[str, Any]] = {}
        self._marked = start
        self._post_control_recv()
        began = time.perf_counter()
        self._train_loop(start)
        elapsed = time.perf_counter() - began
        for link in (self.up_send, self.down_send, self.val_send):
            if link is not None:
                link.flush()
        self._control({"kind": "done", "rank": self.rank, "seconds": elapsed, "steps": self.total - start,
                       "state": self.state.to_json(), "link_buffer_bytes": self.link_buffer_bytes})
        summary = self._finish(start, elapsed) if self.rank == 0 else None
        self._drain_controls()
        for link in (self.up_recv, self.down_recv, self.val_recv):
            if link is not None:
                link.cancel()
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
            if self.feedback_runner is not None:
                # run ahead, but never past the next checkpoint: a checkpoint must be a common state
                limit = min(step + lookahead, next((c for c in checkpoints if c > step), self.total) - 1)
                while next_feedback <= limit:
                    priors[next_feedback] = self._feedback_step(next_feedback)
                    next_feedback += 1
            self._forward_step(step, priors.pop(step, None))
            if self.val_labels is not None and (step + 1) % self.steps_per_epoch == 0:
                self._validate((step + 1) // self.steps_per_epoch - 1)
            if step + 1 in checkpoints:
                self._checkpoint(step + 1)
            self._poll()
            if self.worker.sync:
                wait(self.comm.Ibarrier(), timeout=self.worker.peer_timeout,
                     what=lambda: f"{self.name}: the other ranks at the end of step {step}")
            bar.update()
            if self.rank == self.size - 1:
                sums = self._sums(step)
                bar.set_postfix(loss=f"{sums.loss / sums.samples:.3f}", acc=f"{sums.correct / max(sums.labelled, 1):.3f}")
        bar.close()

    def _drain_controls(self) -> None:
        deadline = time.monotonic() + self.worker.peer_timeout
        # every rank waits for the last mark: then no control message is left unmatched
        while self._control_sends or self._marked < self.total:
            self._poll()
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: control messages still pending after {self.worker.peer_timeout:g} s")
            time.sleep(1e-3)
        wait(self.comm.Ibarrier(), timeout=self.worker.peer_timeout, what=lambda: f"{self.name}: the final barrier")
        self._control_recv.Cancel()
        self._control_recv.Wait()  # a cancelled request must still complete, or MPI_Finalize complains

    def _finish(self, start: int, elapsed: float) -> dict[str, Any]:
        """Rank 0: collect every rank's totals and write train.json (as the in-process runtime does)."""
        deadline = time.monotonic() + self.worker.peer_timeout
        while len(self._done) < self.size:
            self._poll()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.size)) - set(self._done))
                raise PeerError(f"{self.name}: no results from rank(s) {missing} within {self.worker.peer_timeout:g} s")
            time.sleep(1e-3)
        states = [_RankState.from_json(self._done[r]["state"]) for r in range(self.size)]
        history = []
        # every rank's totals cover all epochs, those before a resume too (they travel in its checkpoints)
        for epoch in range(self.train.epochs):
            per = [s.sums.get(epoch, _EpochSums()) for s in states]
            seen = [p.samples for p in per]
            record = {
                "epoch": epoch + 1,
                "loss": [round(p.loss / max(p.samples, 1), 5) for p in per],
                "accuracy": [round(p.correct / max(p.labelled, 1), 5) for p in per],
                "samples": seen[0], "samples_per_block": seen,
            }
            if self.is_bll:
                record["kl"] = [round(p.metric / max(p.samples, 1), 5) for p in per[:-1]]
                record["feedback_loss"] = [round(p.feedback_loss / max(p.feedback_samples, 1), 5) for p in per[:-1]]
            if self.config["method"] == "predsim":  # the similarity term alone, as the in-process runtime reports it
                record["similarity_loss"] = [round(p.metric / max(p.samples, 1), 5) for p in per[:-1]]
            if all(epoch in s.validation for s in states):
                checked = [s.validation[epoch] for s in states]
                record["validation_accuracy"] = [round(c / max(n, 1), 5) for c, n, _, _ in checked]
                record["validation_loss"] = round(checked[-1][2] / max(checked[-1][3], 1), 5)
            history.append(record)
        samples = (self.total - start) * self.batch  # trained by this invocation
        steps_done = self.total  # the byte counters span the whole run, resumed parts included
        up = [s.up_bytes for s in states[:-1]]
        down = [s.down_bytes for s in states[1:-1]] if self.is_bll else []
        wall = max(float(self._done[r]["seconds"]) for r in range(self.size))
        summary = {
            "model": self.config["model"], "method": self.config["method"], "blocks": self.blocks,
            "codec": self.train.codec, "granularity": self.train.granularity, "group_size": self.train.group_size,
            "rounding": self.train.rounding, "transport": "mpi", "ranks": self.size,
            "schedule": "sync" if self.worker.sync else "pipelined",
            "config": asdict(self.train) | {"lr": self.base_lr} | asdict(self.worker),
            "batch_size": self.batch, "steps": self.total, "samples": samples, "seconds": round(wall, 3),
            "samples_per_s": round(samples / max(wall, 1e-9), 2),
            "message_bytes_per_step": [round(b / steps_done, 1) for b in up],
            "feedback_bytes_per_step": [round(b / steps_done, 1) for b in down],
            "message_bytes_per_sample": round((sum(up) + sum(down)) / (steps_done * self.batch), 1),
            "resumed_from_step": start,
            "link_buffer_bytes_per_rank": [int(self._done[r]["link_buffer_bytes"]) for r in range(self.size)],
            "epochs": history,
        }
        write_json_atomic(self.run_dir / TRAIN_NAME, json.dumps(summary, indent=1))
        return summary


def _ANY_SOURCE() -> int:  # noqa: N802 (mpi4py is imported lazily)
    from mpi4py import MPI

    return MPI.ANY_SOURCE
