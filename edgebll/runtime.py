"""``Runtime``: train the K blocks of a run in one process, every message through the codec.

Data flows one way: data -> block 0 -> ... -> last block. Each block takes its local step as soon
as its input arrives; the activation it sends on is encoded to a frame (bytes, as a network would
carry it) and decoded by the next block. No gradient ever crosses a block boundary.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from edgebll import codec as message_codec
from edgebll.augment import check_cutout, cutout
from edgebll.checkpoints import (
    PROGRESS_NAME, TRAINED_DIR, check_disk_room, checkpoint_bytes, clear_trained, mark_step, note, prune_history,
    read_progress, remove_leftovers, restore_step, save_blocks, saved_step,
)
from edgebll.data import InMemoryDataset, full_batches
from edgebll.errors import CodecError, EdgeBLLError, TrainingError
from edgebll.manifest import (
    FEEDBACK_DIR, block_dir_name, check_chain, check_run_agrees, load_run_config, write_json_atomic,
)
from edgebll.metrics import count_correct
from edgebll.options import option
from edgebll.run_data import load_run_dataset, resolve_run_data, same_data
from edgebll.backends import Runner, block_list, open_block
from edgebll.frozen import FrozenRunner
from edgebll.schedule import SCHEDULES, learning_rate
from edgebll.validation import Send, chain_accuracy, check_data_fits, training_data

TRAIN_NAME = "train.json"
EVAL_NAME = "eval.json"


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


def eval_file_name(recorded: dict[str, Any] | None, data_dir: str | os.PathLike | None) -> str:
    """``eval.json`` for the run's own test set; ``eval.<name>.json`` for a dataset folder the run was not exported with."""
    used = resolve_run_data(recorded, data_dir) if data_dir is not None else recorded
    if used is recorded or same_data(recorded, used):
        return EVAL_NAME
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in str((used or {}).get("name", "data")))
    return f"eval.{name or 'data'}.json"


def codec_options(config: TrainConfig, step: int, block: int, feedback: bool = False) -> dict[str, Any]:
    """encode() options of the message that (feedback) block ``block`` sends at ``step``.

    Stochastic rounding needs a seed that differs per step and link and repeats on resume; it is
    a function of these alone, so every transport sends the same bytes.
    """
    seed = ((config.seed * 2**32 + step) * 2**16 + 2 * block + int(feedback)) % 2**64
    return {"granularity": config.granularity, "group_size": config.group_size, "rounding": config.rounding,
            "seed": seed}


def encode_message(message: np.ndarray, config: TrainConfig, step: int, block: int, *, feedback: bool = False,
                   sender: str | None = None) -> bytes:
    """The frame (feedback) block ``block`` sends at ``step`` under ``config``'s codec, for every transport.

    A message the codec refuses (non-finite, wrong dtype) stops training with a TrainingError that
    names the sender (``sender``, default "block K" or "feedback block K") and the step.
    """
    try:
        return message_codec.encode(message, config.codec, **codec_options(config, step, block, feedback))
    except CodecError as exc:
        who = sender or (f"feedback block {block}" if feedback else f"block {block}")
        what = "beta message" if feedback else "activation"
        raise TrainingError(f"{who}, step {step}: cannot send its {what}: {exc}") from exc


def mix_weight(config: TrainConfig, step: int, total: int) -> float:
    """BLL's mixing weight m at ``step`` of ``total``: linear from mix_start to mix_end."""
    return config.mix_start + (config.mix_end - config.mix_start) * step / max(total - 1, 1)


def block_dirs(run_dir: str | os.PathLike, config: dict[str, Any]) -> list[Path]:
    """Every block folder of a run: the forward blocks, then (BLL) their feedback blocks."""
    blocks = int(config["blocks"])
    forward = [Path(run_dir) / block_dir_name(k) for k in range(blocks)]
    return forward + ([f / FEEDBACK_DIR for f in forward[:-1]] if config["method"] == "bll" else [])


class Runtime:
    """All blocks of one run, trained in this process."""

    def __init__(self, run_dir: str | os.PathLike, runners: list[Runner], config: dict[str, Any],
                 feedback: list[Runner] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.runners = runners
        self.feedback = feedback or []
        """BLL: feedback block k (on the same device as forward block k), k < K-1."""
        self.config = config
        self._resumable: dict[str, Any] = {}
        """What progress.json holds beyond the step: the interrupted epoch's running totals (in-process runs)."""

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, threads: int = 0, load_trained: bool = True,
                 verify_files: bool = True, backend: str = "auto", provider: str = "cpu",
                 freeze_blocks: Sequence[int] = ()) -> Runtime:
        """Load and validate every block of ``run_dir`` (an ``edgebll export`` output folder).

        ``backend``: "ort-training", "portable" (plain onnxruntime) or "auto" (the training build
        where it is installed, else the portable graphs); ``provider``: "cpu" or "cuda".
        ``freeze_blocks``: forward blocks that will not train (fine-tuning the others): they load
        their eval graph and weights only, no gradients or optimizer state, and ``train`` keeps them
        frozen.
        """
        config = load_run_config(run_dir)
        blocks = int(config["blocks"])
        progress = read_progress(Path(run_dir)) if load_trained else None
        if progress is not None:  # a crash between two blocks' saves: every block goes back to the common step
            moved = restore_step(block_dirs(run_dir, config), progress["step"], saved_step)
            if moved:
                note(f"{run_dir}: using step {progress['step']}, the last step every block saved ({PROGRESS_NAME}); "
                     f"put back {', '.join(moved)}")
        load = dict(threads=threads, load_trained=load_trained, verify_files=verify_files, backend=backend,
                    provider=provider)
        TrainConfig(freeze_blocks=tuple(freeze_blocks)).check_frozen(blocks)
        runners = [open_block(Path(run_dir) / block_dir_name(k), frozen=k in freeze_blocks, **load)
                   for k in range(blocks)]
        check_chain([r.manifest for r in runners], run_dir)
        check_run_agrees(config, [r.manifest for r in runners], run_dir)
        feedback = []
        if config["method"] == "bll":
            feedback = [open_block(Path(run_dir) / block_dir_name(k) / FEEDBACK_DIR, **load) for k in range(blocks - 1)]
        runtime = cls(run_dir, runners, config, feedback)
        if progress is not None:
            runtime._resumable = progress.get("inprocess") or {}
        return runtime

    @property
    def is_bll(self) -> bool:
        return bool(self.feedback)

    @property
    def all_runners(self) -> list[Runner]:
        return self.runners + self.feedback

    @property
    def num_blocks(self) -> int:
        return len(self.runners)

    @staticmethod
    def _send(message: np.ndarray, config: TrainConfig, step: int, block: int,
              feedback: bool = False) -> tuple[np.ndarray, int]:
        """Encode ``message`` as (feedback) block ``block`` sends it, decode it as its neighbour receives it."""
        frame = encode_message(message, config, step, block, feedback=feedback)
        return message_codec.decode(frame), len(frame)

    def train(self, config: TrainConfig | None = None, *, data: InMemoryDataset | None = None, data_dir: str | None = None,
              progress: bool = True, **overrides: Any) -> dict[str, Any]:
        """Train every block for ``config.epochs`` epochs; writes and returns ``train.json``'s content.

        ``data`` defaults to the training split of run.json's dataset (Fashion-MNIST from ``data_dir``,
        or the synthetic sequence task). Keyword overrides
        set fields of ``TrainConfig`` (``runtime.train(epochs=2, codec="fp16")``).
        """
        config = config or TrainConfig()
        for key, value in overrides.items():
            setattr(config, key, value)
        loaded_frozen = tuple(k for k, r in enumerate(self.runners) if isinstance(r, FrozenRunner))
        config.freeze_blocks = tuple(sorted(set(config.freeze_blocks) | set(loaded_frozen)))
        config.validate()
        config.check_frozen(self.num_blocks)
        frozen = set(config.freeze_blocks)
        data, validation = training_data(data, data_dir, config.limit, config.val_split, self.config.get("data"))
        check_data_fits(data, [r.manifest for r in self.runners], "training data")
        check_cutout(config.cutout, data.arrays()[0].shape, self.config["model"])
        batch = int(self.config["batch_size"])
        steps_per_epoch = full_batches(len(data), batch)
        total = steps_per_epoch * config.epochs
        base_lr = float(config.lr if config.lr is not None else self.config["lr"])
        start = self._start_step(config.resume)
        remove_leftovers([r.block_dir for r in self.all_runners], self.run_dir)
        if start == 0:  # starting over: no earlier checkpoint of the run may be resumed by mistake
            clear_trained([r.block_dir for r in self.all_runners], self.run_dir)
        check_disk_room(self.run_dir, self._checkpoint_bytes())
        resumed = self._resumable if config.resume and start > 0 else {}
        history = resumed.get("epochs", self._load_history()) if config.resume and start > 0 else []
        up_bytes = np.zeros(max(self.num_blocks - 1, 1), dtype=np.int64)
        down_bytes = np.zeros(max(self.num_blocks - 2, 1), dtype=np.int64)
        if "up_bytes" in resumed:
            up_bytes[:], down_bytes[:] = resumed["up_bytes"], resumed["down_bytes"]
        samples, began, validating = 0, time.perf_counter(), 0.0
        step = start
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)
        for epoch in range(start // steps_per_epoch, config.epochs):
            # per block: loss, correct; BLL adds the KL of each forward block and the feedback losses
            sums = np.zeros((4, self.num_blocks))
            seen, labelled, epoch_began = 0, 0, time.perf_counter()  # labelled: labels (per-token: tokens) seen
            done = step - epoch * steps_per_epoch  # batches of this epoch trained before a resume
            if done and resumed.get("epoch") == epoch:  # the interrupted epoch's totals go on
                sums[:], seen, labelled = resumed["sums"], resumed["seen"], resumed["labelled"]
            for x, labels in data.batches(batch, shuffle=True, seed=config.seed, epoch=epoch, drop_last=True,
                                          start_batch=done):
                lr = learning_rate(config.schedule, base_lr, step, total, config.warmup_steps)
                x = cutout(x, config.cutout, seed=config.seed, step=step) if config.cutout else x
                priors = self._feedback_step(labels, lr, step, config, sums, down_bytes) if self.is_bll else None
                mix = mix_weight(config, step, total)
                h = x
                for k, runner in enumerate(self.runners):
                    side = labels if priors is None or k == self.num_blocks - 1 else (mix * priors[k]).astype(np.float32)
                    result = runner.frozen_step(h, side) if k in frozen else runner.train_step(h, side, lr)
                    sums[0, k] += result.loss * len(labels)
                    sums[1, k] += count_correct(result.logits, labels)
                    if result.metric is not None:
                        sums[2, k] += result.metric * len(labels)
                    if result.message is not None:
                        h, nbytes = self._send(result.message, config, step, k)
                        up_bytes[k] += nbytes
                seen += len(labels)
                labelled += labels.size
                samples += len(labels)
                step += 1
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step % steps_per_epoch:
                    self.save(epoch=epoch, totals={"epoch": epoch, "sums": sums.tolist(), "seen": seen,
                                                   "labelled": labelled, "epochs": history,
                                                   "up_bytes": up_bytes.tolist(), "down_bytes": down_bytes.tolist()})
                bar.update()
                bar.set_postfix(loss=f"{sums[0, -1] / seen:.3f}", acc=f"{sums[1, -1] / labelled:.3f}")
            record = {
                "epoch": epoch + 1,
                "loss": (sums[0] / max(seen, 1)).round(5).tolist(),
                "accuracy": (sums[1] / max(labelled, 1)).round(5).tolist(),
                "samples": seen,
                "seconds": round(time.perf_counter() - epoch_began, 3),
            }
            if self.is_bll:
                record["kl"] = (sums[2, :-1] / max(seen, 1)).round(5).tolist()
                record["feedback_loss"] = (sums[3, :-1] / max(seen, 1)).round(5).tolist()
            if self.config["method"] == "predsim":  # the similarity term alone, per block below the classifier
                record["similarity_loss"] = (sums[2, :-1] / max(seen, 1)).round(5).tolist()
            if validation is not None:
                checked = time.perf_counter()
                record["validation_accuracy"], record["validation_loss"] = chain_accuracy(
                    self.runners, validation, self._eval_send(config.codec, config.granularity, config.group_size),
                    batch_size=batch)
                validating += time.perf_counter() - checked  # not training time: kept out of samples_per_s
            history.append(record)
            self.save(epoch=epoch + 1, totals={"epoch": epoch + 1, "epochs": history, "up_bytes": up_bytes.tolist(),
                                               "down_bytes": down_bytes.tolist()})
        bar.close()
        elapsed = time.perf_counter() - began - validating
        steps_done = max(step - start, 1)
        down = down_bytes if self.num_blocks > 2 else np.zeros(0)
        summary = {
            "model": self.config["model"], "method": self.config["method"], "blocks": self.num_blocks,
            "codec": config.codec, "granularity": config.granularity, "group_size": config.group_size,
            "rounding": config.rounding, "transport": "inprocess", "ranks": 1,
            "config": asdict(config) | {"lr": base_lr}, "batch_size": batch, "steps": step,
            "samples": samples, "seconds": round(elapsed, 3), "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
            "message_bytes_per_step": (up_bytes / steps_done).round(1).tolist() if self.num_blocks > 1 else [],
            "feedback_bytes_per_step": (down / steps_done).round(1).tolist() if self.is_bll else [],
            "message_bytes_per_sample": round(float(up_bytes.sum() + down.sum()) / max(samples, 1), 1),
            "epochs": history,
        }
        write_json_atomic(self.run_dir / TRAIN_NAME, json.dumps(summary, indent=1))
        return summary

    def _feedback_step(self, labels: np.ndarray, lr: float, step: int, config: TrainConfig, sums: np.ndarray,
                       down_bytes: np.ndarray) -> list[np.ndarray]:
        """BLL's backward pass: train every feedback block top-down; returns b_k for every forward block k < K-1.

        It needs only the labels, never the forward blocks: forward and feedback passes do not wait
        for each other. beta_{K-1} is the one-hot target; beta_k = sigmoid(b_k) travels down to
        device k-1 through the codec, like an activation travels up.
        """
        target = np.eye(int(self.config["num_classes"]), dtype=np.float32)[labels]
        beta = target
        priors: list[np.ndarray] = [np.empty(0)] * len(self.feedback)
        for k in range(len(self.feedback) - 1, -1, -1):
            result = self.feedback[k].train_step(beta, target, lr * config.feedback_lr_scale)
            priors[k] = result.logits
            sums[3, k] += result.loss * len(labels)
            if k > 0:
                assert result.message is not None, "feedback blocks send beta down"
                beta, nbytes = self._send(result.message, config, step, k, feedback=True)
                down_bytes[k - 1] += nbytes
        return priors

    def _start_step(self, resume: bool) -> int:
        """The global step to start from: 0, or (resuming) the step every block has reached."""
        steps = {r.progress["step"] for r in self.all_runners}
        if not resume:
            if any(s > 0 for s in steps):
                raise EdgeBLLError(f"{self.run_dir}: blocks already hold trained weights ({TRAINED_DIR}/); hint: pass "
                                   "--resume to continue, or load with load_trained=False / --restart to start over")
            return 0
        if len(steps) != 1:
            # progress.json would have put them back to a common step: the run stopped inside its first checkpoint
            raise EdgeBLLError(f"{self.run_dir}: blocks stopped at different steps {sorted(steps)} and no step was saved "
                               f"by every block ({PROGRESS_NAME} is missing), so there is no common state to resume; "
                               "hint: --restart (it loses no complete checkpoint)")
        return steps.pop()

    def _load_history(self) -> list[dict[str, Any]]:
        path = self.run_dir / TRAIN_NAME
        return json.loads(path.read_text()).get("epochs", []) if path.is_file() else []

    def _checkpoint_bytes(self) -> int:
        return sum(checkpoint_bytes(r.manifest, r.block_dir) for r in self.all_runners)

    def save(self, *, epoch: int, totals: dict[str, Any] | None = None) -> int:
        """Checkpoint every block at their common step, as one: either every block's state of that step is the
        run's checkpoint (``progress.json``), or the previous one stays. Returns the step.

        Weights that are no longer finite are refused before anything is written, so the last good
        checkpoint stays. ``totals``: the running epoch's totals, so that a resumed train.json
        covers the whole epoch.
        """
        steps = {r.progress["step"] for r in self.all_runners}
        if len(steps) != 1:
            raise TrainingError(f"{self.run_dir}: blocks are at different steps {sorted(steps)}; cannot checkpoint")
        step = steps.pop()
        save_blocks(self.all_runners, step=step, epoch=epoch, run_dir=self.run_dir)
        record = {"step": step, "epoch": epoch, "transport": "inprocess", "blocks": self.num_blocks,
                  "inprocess": totals or {}}
        mark_step(self.run_dir, record)
        self._resumable = record["inprocess"]
        prune_history([r.block_dir for r in self.all_runners], step)
        return step

    def evaluate(self, *, data: InMemoryDataset | None = None, data_dir: str | None = None, limit: int | None = None,
                 codec: str | None = None, granularity: str | None = None, progress: bool = True,
                 batch_size: int | None = None) -> dict[str, Any]:
        """Test accuracy of every block's head through the eval graphs; writes and returns ``eval.json``.

        On other data than the run's own test set (``data`` given, or ``data_dir`` a dataset folder
        the run was not exported with) the result goes to ``eval.<dataset>.json`` instead, and
        ``result_file`` in the summary names it.

        Accuracy is per label: per image, or per token for a sequence model (``samples`` counts
        sequences). ``data`` defaults to the test split of run.json's dataset.

        ``batch_size`` defaults to the run's training batch size, which the memory profile covers.
        The messages go through the codec the run was trained with (from train.json), unless given.
        BLL evaluates the forward chain alone: the feedback blocks are not needed at test time (the
        prior input of a forward block only feeds its loss, so it is zero here).
        """
        trained = self._load_train_summary()
        codec = codec or trained.get("codec", "fp32")
        granularity = granularity or trained.get("granularity", "tensor")
        result_name = "eval.given.json" if data is not None else eval_file_name(self.config.get("data"), data_dir)
        if data is None:
            data = load_run_dataset(self.config.get("data"), "test", data_dir, limit=limit)
        elif limit is not None:
            data = data.subset(limit)
        check_data_fits(data, [r.manifest for r in self.runners], "test data")
        began = time.perf_counter()
        send = self._eval_send(codec, granularity, int(trained.get("group_size", 64)))
        if batch_size is not None and batch_size < 1:
            raise EdgeBLLError(f"the eval batch size must be at least 1, got {batch_size}")
        batch_size = batch_size or int(self.config["batch_size"])
        per_block, loss = chain_accuracy(self.runners, data, send, batch_size=batch_size, progress=progress)
        summary = {
            "test_accuracy": per_block[-1], "per_block_accuracy": per_block, "test_loss": loss,
            "samples": len(data), "codec": codec, "granularity": granularity, "method": self.config["method"],
            "model": self.config["model"], "blocks": self.num_blocks,
            "trained_epochs": self.runners[-1].progress["epoch"], "trained_step": self.runners[-1].progress["step"],
            "batch_size": batch_size,
            "seconds": round(time.perf_counter() - began, 3),
        }
        if result_name != EVAL_NAME:
            summary["result_file"] = result_name  # not the run's own test set: its eval.json stays
        write_json_atomic(self.run_dir / result_name, json.dumps(summary, indent=1))
        return summary

    def _eval_send(self, codec: str, granularity: str, group_size: int) -> Send:
        """How eval-time messages travel: through the codec, not counted, no stochastic rounding."""
        config = TrainConfig(codec=codec, granularity=granularity, group_size=group_size)
        return lambda message, block: self._send(message, config, -1, block)[0]

    def _load_train_summary(self) -> dict[str, Any]:
        path = self.run_dir / TRAIN_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def export_for_inference(self, out_dir: str | os.PathLike) -> list[Path]:
        """One inference ONNX model per block (``x`` -> ``logits``; chain them through the messages)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [r.export_for_inference(out / f"block-{r.index}.onnx") for r in self.runners]
