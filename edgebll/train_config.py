"""How to train a run (``TrainConfig``; ``WorkerConfig`` for the MPI ranks' links: their fields are also the
CLI's options) and what every transport derives from it alike: BLL's mixing weight, the codec options and frame of
each message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgebll import codec as message_codec
from edgebll.backends import block_list
from edgebll.errors import CodecError, EdgeBLLError, TrainingError
from edgebll.options import option
from edgebll.schedule import SCHEDULES


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """How to train a run (defaults that work; ``lr`` None takes run.json's)."""

    epochs: int = option(1, "epochs to train; with --resume the run continues until it has done this many")
    codec: str = option("int8", "message codec between blocks", choices=message_codec.CODECS)
    granularity: str = option("tensor", "scales of the int codecs: one per tensor, per channel, or per group of "
                              "--group-size consecutive values", choices=message_codec.GRANULARITIES)
    group_size: int = option(message_codec.DEFAULT_GROUP_SIZE, "values per scale with --granularity group",
                             metavar="N")
    rounding: str = option("nearest", "rounding of the int codecs: nearest, or stochastic (unbiased; seeded per step "
                           "and block, so a resumed run sends the same bytes)", choices=message_codec.ROUNDINGS)
    lr: float | None = option(None, "base learning rate (none: the one given at export)", parse=float)
    schedule: str = option("cosine", "learning-rate schedule over all steps", choices=tuple(SCHEDULES))
    warmup_steps: int = option(0, "linear warmup steps")
    limit: int | None = option(None, "train on the first N samples only (images, or sequences of the sequence task)",
                               metavar="N", parse=int)
    seed: int = option(0, "shuffling seed (the order is a function of seed and epoch, so a resumed run repeats it)")
    resume: bool = option(False, "continue from the run's last checkpoint (every block's) up to --epochs")
    checkpoint_every: int = option(0, "also checkpoint every STEPS steps (0: at the end of each epoch only)",
                                   metavar="STEPS")
    mix_start: float = option(2.0, "bll: weight m of the feedback natural parameters b in the posterior (natural "
                              "parameters a + m*b) at the first step", metavar="M")
    mix_end: float = option(0.5, "bll: m at the last step (linear in between: the forward latent is trusted more as "
                            "it learns)", metavar="M")
    feedback_lr_scale: float = option(10.0, "bll: feedback blocks learn at S times --lr (they are tiny, and until "
                                      "they carry the label the forward blocks' targets are uninformative)",
                                      metavar="S")
    cutout: int = option(0, "cutout augmentation: zero one SIZE x SIZE square per training image, placed anew every "
                         "step (seeded by --seed and the step, so --resume repeats it; 0: off)", metavar="SIZE")
    val_split: int = option(0, "hold out the last N training images; train.json reports each epoch's accuracy on them "
                            "(make model choices there; `edgebll eval` gives the final test accuracy)", metavar="N")
    freeze_blocks: tuple[int, ...] = option((), "forward blocks that do not train, e.g. 0,1 to fine-tune the top of a "
                                            "pretrained run: they load only their eval graph and weights and pass "
                                            "their message on; their weights stay byte for byte",
                                            metavar="K[,K...]", parse=block_list)

    def validate(self) -> None:
        if self.epochs < 1:
            raise EdgeBLLError(f"--epochs must be at least 1, got {self.epochs}")
        if self.codec not in message_codec.CODECS:
            raise EdgeBLLError(f"unknown codec {self.codec!r}; choose one of {list(message_codec.CODECS)}")
        if self.granularity not in message_codec.GRANULARITIES:
            raise EdgeBLLError(f"unknown granularity {self.granularity!r}; choose one of {list(message_codec.GRANULARITIES)}")
        if self.rounding not in message_codec.ROUNDINGS:
            raise EdgeBLLError(f"unknown rounding {self.rounding!r}; choose one of {list(message_codec.ROUNDINGS)}")
        if self.group_size < 1:
            raise EdgeBLLError(f"--group-size must be at least 1, got {self.group_size}")
        if self.schedule not in SCHEDULES:
            raise EdgeBLLError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise EdgeBLLError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.feedback_lr_scale) and self.feedback_lr_scale > 0):
            raise EdgeBLLError(f"--feedback-lr-scale must be a finite number > 0, got {self.feedback_lr_scale}")
        counts = {"--seed": self.seed, "--warmup-steps": self.warmup_steps, "--checkpoint-every": self.checkpoint_every}
        for flag, value in counts.items():
            if value < 0:
                raise EdgeBLLError(f"{flag} must be >= 0, got {value}")
        if self.limit is not None and self.limit < 1:
            raise EdgeBLLError(f"--limit must be at least 1, got {self.limit}")
        if self.cutout < 0 or self.val_split < 0:
            raise EdgeBLLError(f"--cutout and --val-split must be >= 0, got {self.cutout} and {self.val_split}")
        if not (math.isfinite(self.mix_start) and math.isfinite(self.mix_end)) or self.mix_start < 0 or self.mix_end < 0:
            raise EdgeBLLError(f"BLL mixing weights must be >= 0, got --mix-start {self.mix_start} --mix-end {self.mix_end}")

    def check_frozen(self, num_blocks: int) -> None:
        """``freeze_blocks`` against a run of ``num_blocks`` forward blocks."""
        wrong = [k for k in self.freeze_blocks if not 0 <= k < num_blocks]
        if wrong:
            raise EdgeBLLError(f"--freeze-blocks {wrong[0]}: the run has blocks 0..{num_blocks - 1}")
        if len(set(self.freeze_blocks)) == num_blocks:
            raise EdgeBLLError(f"--freeze-blocks freezes all {num_blocks} blocks: nothing would train; leave one out")


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


def codec_options(config: TrainConfig, step: int, block: int, feedback: bool = False) -> dict[str, Any]:
    """encode() options of the message that (feedback) block ``block`` sends at ``step``.

    Stochastic rounding needs a seed that differs per step and link and repeats on resume; it is
    a function of these alone, so every transport sends the same bytes.
    """
    seed = ((config.seed * 2**32 + step) * 2**16 + 2 * block + int(feedback)) % 2**64
    return {"granularity": config.granularity, "group_size": config.group_size, "rounding": config.rounding,
            "seed": seed}


def encode_message(message: np.ndarray, config: TrainConfig, step: int, block: int, *, feedback: bool = False,
                   sender: str | None = None, out: np.ndarray | None = None, offset: int = 0) -> bytes | memoryview:
    """The frame (feedback) block ``block`` sends at ``step`` under ``config``'s codec, for every transport
    (written into ``out`` at ``offset`` when given: :func:`edgebll.codec.encode`).

    A message the codec refuses (non-finite, wrong dtype) stops training with a TrainingError that
    names the sender (``sender``, default "block K" or "feedback block K") and the step.
    """
    options = codec_options(config, step, block, feedback)
    try:
        if out is not None:
            return message_codec.encode(message, config.codec, out=out, offset=offset, **options)
        return message_codec.encode(message, config.codec, **options)
    except CodecError as exc:
        who = sender or (f"feedback block {block}" if feedback else f"block {block}")
        what = "beta message" if feedback else "activation"
        raise TrainingError(f"{who}, step {step}: cannot send its {what}: {exc}") from exc


def mix_weight(start: float, end: float, step: int, total: int) -> float:
    """BLL's mixing weight m at ``step`` of ``total``: linear from ``start`` (``--mix-start``) to ``end``."""
    return start + (end - start) * step / max(total - 1, 1)
