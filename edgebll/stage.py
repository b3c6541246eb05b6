"""One block's part of a training step, the same for both transports.

A :class:`Stage` is forward block k and, for BLL, its feedback block k (both live on the same
device). Each step it takes its input from a link (block 0: from the data), trains, adds its
figures to its totals and sends its message on through a link. The in-process runtime is K
stages joined by :class:`LocalLink` queues; an MPI rank is one stage on the MPI links of
:mod:`edgebll.links`, which have the same two methods (``send_written``, ``take``).
train.json's figures come from the stages' totals (:func:`train_summary`), so the two transports
report the same numbers by construction, and a stage's totals travel in every checkpoint
(``history/step-N/stage.json``), so a run resumed on either transport reports its whole epochs.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from edgebll import codec as message_codec
from edgebll.backends import Runner
from edgebll.checkpoints import history_dir
from edgebll.errors import CodecError, TrainingError
from edgebll.links import PeerError
from edgebll.metrics import count_correct
from edgebll.train_config import TrainConfig, encode_message, mix_weight
from edgebll.run_folder import RunConfig
from edgebll.schedule import learning_rate

STAGE_STATE = "stage.json"
"""A stage's totals, kept with each checkpoint of its forward block (``trained/history/step-N/stage.json``)."""

T = TypeVar("T")


Write = Callable[[np.ndarray, int], Sized]
"""``write(buffer, offset)``: writes a frame into ``buffer`` from ``offset`` on and returns the bytes written."""


class Link(Protocol):
    """Where a stage sends a frame, or takes the frame of a step from; ``peer`` and ``describe`` name it in errors."""

    peer: int
    describe: str

    def send_written(self, capacity: int, write: Write, step: int) -> int: ...

    def take(self, step: int, read: Callable[[memoryview], T]) -> T: ...


class LocalLink:
    """A link between two stages of one process: the frames wait in order until the neighbour takes them."""

    def __init__(self, peer: int, describe: str) -> None:
        self.peer, self.describe = peer, describe
        self._frames: deque[tuple[int, memoryview]] = deque()

    def send_written(self, capacity: int, write: Write, step: int) -> int:
        """Queue the frame ``write`` puts into a new buffer of ``capacity`` bytes as the message of ``step``."""
        buffer = np.empty(capacity, np.uint8)
        size = len(write(buffer, 0))
        self._frames.append((step, memoryview(buffer)[:size]))
        return size

    def take(self, step: int, read: Callable[[memoryview], T]) -> T:
        sent, frame = self._frames.popleft()
        if sent != step:  # the in-process schedule sends before it takes: a mismatch is a bug here, not a peer's
            raise TrainingError(f"internal error: the {self.describe} link holds step {sent}, step {step} was asked for")
        return read(memoryview(frame))


@dataclass(slots=True)
class EpochSums:
    """One stage's running totals for one epoch."""

    loss: float = 0.0
    correct: int = 0
    metric: float = 0.0
    feedback_loss: float = 0.0
    samples: int = 0
    feedback_samples: int = 0
    labelled: int = 0
    """Labels counted for the accuracy: one per sample (images), one per token (the sequence task)."""
    seconds: float = 0.0
    """Time spent in this epoch's steps (in process: every block's; over MPI: this rank's loop)."""


@dataclass(slots=True)
class StageState:
    """What a stage must restore to go on from a checkpoint step: its totals over the whole run."""

    step: int = 0
    sums: dict[int, EpochSums] = field(default_factory=dict)
    up_bytes: int = 0
    down_bytes: int = 0
    validation: dict[int, list[float]] = field(default_factory=dict)
    """Per epoch, this stage's block on the validation split: [correct, labelled, loss sum, samples]."""

    def epoch(self, epoch: int) -> EpochSums:
        return self.sums.setdefault(epoch, EpochSums())

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "up_bytes": self.up_bytes, "down_bytes": self.down_bytes,
                           "sums": {str(e): asdict(s) for e, s in self.sums.items()},
                           "validation": {str(e): v for e, v in self.validation.items()}})

    @classmethod
    def from_json(cls, text: str) -> StageState:
        data = json.loads(text)
        return cls(int(data["step"]), {int(e): EpochSums(**s) for e, s in data["sums"].items()},
                   int(data["up_bytes"]), int(data["down_bytes"]),
                   {int(e): v for e, v in data.get("validation", {}).items()})

    @classmethod
    def at(cls, block_dir: Path, step: int) -> StageState:
        """The totals kept with ``block_dir``'s checkpoint of ``step``; a checkpoint without them (an older
        release's) resumes with totals that count from ``step``."""
        kept = history_dir(block_dir, step) / STAGE_STATE
        return cls.from_json(kept.read_text()) if step and kept.is_file() else cls(step=step)


class Stage:
    """Forward block ``runner.index`` (and BLL's feedback block of that index) with its links and totals."""

    def __init__(self, runner: Runner, feedback: Runner | None, *, train: TrainConfig, num_classes: int, total: int,
                 steps_per_epoch: int, base_lr: float, state: StageState, name: str | None = None,
                 up_in: Link | None = None, up_out: Link | None = None, down_in: Link | None = None,
                 down_out: Link | None = None) -> None:
        self.runner, self.feedback, self.train, self.state = runner, feedback, train, state
        self.num_classes, self.total, self.steps_per_epoch, self.base_lr = num_classes, total, steps_per_epoch, base_lr
        self.index = runner.index
        self.name = name
        """How errors name the sender (None: "block K" / "feedback block K")."""
        self.up_in, self.up_out, self.down_in, self.down_out = up_in, up_out, down_in, down_out
        self.frozen = self.index in train.freeze_blocks

    def kept_totals(self, step: int) -> dict[Path, dict[str, str]]:
        """The totals to keep with the checkpoint of ``step`` (``save_blocks``' ``extra``), beside the forward block."""
        self.state.step = step
        return {self.runner.block_dir: {STAGE_STATE: self.state.to_json()}}

    @property
    def runners(self) -> list[Runner]:
        """The blocks this stage trains and checkpoints: its forward block, and its feedback block where it has one."""
        return [self.runner] + ([self.feedback] if self.feedback is not None else [])

    def lr(self, step: int) -> float:
        return learning_rate(self.train.schedule, self.base_lr, step, self.total, self.train.warmup_steps)

    def feedback_step(self, step: int, labels: np.ndarray) -> np.ndarray:
        """Train the feedback block on ``step``; send beta down; return the prior b_k of that step.

        beta_{K-1} is the one-hot target; beta_k = sigmoid(b_k) travels down to block k-1 through
        the codec, like an activation travels up. It needs only the labels, never the forward blocks.
        """
        assert self.feedback is not None
        target = np.eye(self.num_classes, dtype=np.float32)[labels]
        beta = target if self.down_in is None else self.receive(self.down_in, step, self.feedback, len(labels))
        result = self.feedback.train_step(beta, target, self.lr(step) * self.train.feedback_lr_scale)
        sums = self.state.epoch(step // self.steps_per_epoch)
        sums.feedback_loss += result.loss * len(labels)
        sums.feedback_samples += len(labels)
        if self.down_out is not None:
            self.state.down_bytes += self._send(self.down_out, result.message, step, feedback=True)
        return result.logits

    def forward_step(self, step: int, labels: np.ndarray, *, x: np.ndarray | None = None,
                     prior: np.ndarray | None = None) -> None:
        """Train (or, frozen, run) the forward block on ``step``: its input is ``x`` (block 0) or the frame of the
        block below; BLL's side input is the mixed prior. The message goes up."""
        if x is None:
            assert self.up_in is not None, "block 0 takes the data"
            x = self.receive(self.up_in, step, self.runner, len(labels))
        mix = mix_weight(self.train.mix_start, self.train.mix_end, step, self.total)
        side = labels if prior is None else (mix * prior).astype(np.float32)
        if self.frozen:
            result = self.runner.frozen_step(x, side)
        else:
            result = self.runner.train_step(x, side, self.lr(step))
        sums = self.state.epoch(step // self.steps_per_epoch)
        sums.loss += result.loss * len(labels)
        sums.correct += count_correct(result.logits, labels)
        sums.labelled += labels.size
        if result.metric is not None:
            sums.metric += result.metric * len(labels)
        sums.samples += len(labels)
        if self.up_out is not None:
            self.state.up_bytes += self._send(self.up_out, result.message, step, feedback=False)

    def _send(self, link: Link, message: np.ndarray | None, step: int, feedback: bool) -> int:
        """Encode ``message`` straight into the buffer ``link`` sends from; returns the frame's bytes."""
        assert message is not None, "a block with a neighbour to send to outputs a message"
        size = message_codec.frame_nbytes(message.shape, self.train.codec, self.train.granularity,
                                          self.train.group_size)
        return link.send_written(size, lambda out, offset: self.encode(message, step, feedback, out, offset), step)

    def encode(self, message: np.ndarray, step: int, feedback: bool, out: np.ndarray | None = None,
               offset: int = 0) -> bytes | memoryview:
        return encode_message(message, self.train, step, self.index, feedback=feedback, sender=self.name, out=out,
                              offset=offset)

    def receive(self, link: Link, step: int, runner: Runner, batch: int) -> np.ndarray:
        """The message of ``step`` from ``link``, decoded and checked against what ``runner`` takes."""
        shape = [batch, *runner.manifest.inputs[0].per_sample_shape()]
        who = self.name or runner.name

        def read(frame: memoryview) -> np.ndarray:
            try:
                array = message_codec.decode(frame)
            except CodecError as exc:
                raise PeerError(f"{who}: rejected the {link.describe} frame from rank {link.peer} for step "
                                f"{step}: {exc}; it was not fed to the block") from exc
            if list(array.shape) != shape:
                raise PeerError(f"{who}: rejected the {link.describe} frame from rank {link.peer} for step "
                                f"{step}: shape {list(array.shape)}, but the block takes {shape}; it was not fed to "
                                "the block; hint: re-export all blocks together")
            return array

        return link.take(step, read)


def epoch_records(states: Sequence[StageState], epochs: int, method: str) -> list[dict[str, Any]]:
    """train.json's ``epochs``: per epoch, every block's loss and accuracy (and BLL's KL and feedback loss,
    Pred-Sim's similarity term, the validation split's accuracy) from the stages' totals, in block order."""
    history = []
    for epoch in range(epochs):
        if not any(epoch in s.sums for s in states):
            continue  # trained before a resume from a checkpoint that kept no totals (an older release's)
        per = [s.sums.get(epoch, EpochSums()) for s in states]
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": [round(p.loss / max(p.samples, 1), 5) for p in per],
            "accuracy": [round(p.correct / max(p.labelled, 1), 5) for p in per],
            "samples": per[0].samples, "samples_per_block": [p.samples for p in per],
            "seconds": round(max(p.seconds for p in per), 3),
        }
        if method == "bll":
            record["kl"] = [round(p.metric / max(p.samples, 1), 5) for p in per[:-1]]
            record["feedback_loss"] = [round(p.feedback_loss / max(p.feedback_samples, 1), 5) for p in per[:-1]]
        if method == "predsim":  # the similarity term alone, per block below the classifier
            record["similarity_loss"] = [round(p.metric / max(p.samples, 1), 5) for p in per[:-1]]
        if all(epoch in s.validation for s in states):
            checked = [s.validation[epoch] for s in states]
            record["validation_accuracy"] = [round(c / max(n, 1), 5) for c, n, _, _ in checked]
            record["validation_loss"] = round(checked[-1][2] / max(checked[-1][3], 1), 5)
        history.append(record)
    return history


def train_summary(states: Sequence[StageState], *, run_config: RunConfig, train: TrainConfig, base_lr: float,
                  batch: int, total: int, start: int, seconds: float, transport: str, ranks: int,
                  config_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """train.json's content for a run of ``total`` steps, ``start`` of them done before this invocation.

    Message bytes are per step over the whole run (the stages count across resumes), samples and
    throughput those of this invocation.
    """
    samples = (total - start) * batch
    up = [s.up_bytes for s in states[:-1]]
    down = [s.down_bytes for s in states[1:-1]] if run_config.method == "bll" else []
    return {
        "model": run_config.model, "method": run_config.method, "blocks": len(states),
        "codec": train.codec, "granularity": train.granularity, "group_size": train.group_size,
        "rounding": train.rounding, "transport": transport, "ranks": ranks,
        "config": asdict(train) | {"lr": base_lr} | (config_extra or {}),
        "batch_size": batch, "steps": total, "samples": samples, "seconds": round(seconds, 3),
        "samples_per_s": round(samples / max(seconds, 1e-9), 2),
        "message_bytes_per_step": [round(b / max(total, 1), 1) for b in up],
        "feedback_bytes_per_step": [round(b / max(total, 1), 1) for b in down],
        "message_bytes_per_sample": round((sum(up) + sum(down)) / max(total * batch, 1), 1),
        "resumed_from_step": start,
        "epochs": epoch_records(states, train.epochs, run_config.method),
    }
