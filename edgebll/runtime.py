"""``Runtime``: train the K blocks of a run in one process, every message through the codec.

Data flows one way: data -> block 0 -> ... -> last block. Each block takes its local step as soon
as its input arrives; the activation it sends on is encoded to a frame (bytes, as a network would
carry it) and decoded by the next block. No gradient ever crosses a block boundary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgebll import codec as message_codec
from edgebll.augment import check_cutout, cutout
from edgebll.backends import Runner, open_block
from edgebll.checkpoints import (
    PROGRESS_NAME, TRAINED_DIR, check_disk_room, checkpoint_bytes, clear_trained, mark_step, note, prune_history,
    read_progress, remove_leftovers, restore_step, save_blocks, saved_step,
)
from edgebll.batching import InMemoryDataset, full_batches
from edgebll.errors import EdgeBLLError, TrainingError
from edgebll.frozen import FrozenRunner
from edgebll.json_files import write_json_atomic
from edgebll.manifest import check_chain, check_run_agrees
from edgebll.run_folder import FEEDBACK_DIR, RunConfig, block_dir_name, block_dirs, load_run_config
from edgebll.run_data import load_run_dataset, resolve_run_data, same_data
from edgebll.stage import LocalLink, Stage, StageState, train_summary
from edgebll.train_config import TrainConfig, encode_message
from edgebll.validation import Send, chain_accuracy, chain_counts, check_data_fits, training_data

__all__ = ["EVAL_NAME", "TRAIN_NAME", "Runtime", "TrainConfig", "encode_message", "eval_file_name"]

TRAIN_NAME = "train.json"
EVAL_NAME = "eval.json"


def eval_file_name(recorded: dict[str, Any] | None, data_dir: str | os.PathLike | None) -> str:
    """``eval.json`` for the run's own test set; ``eval.<name>.json`` for a dataset folder the run was not exported with."""
    used = resolve_run_data(recorded, data_dir) if data_dir is not None else recorded
    if used is recorded or same_data(recorded, used):
        return EVAL_NAME
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in str((used or {}).get("name", "data")))
    return f"eval.{name or 'data'}.json"


class Runtime:
    """All blocks of one run, trained in this process."""

    def __init__(self, run_dir: str | os.PathLike, runners: list[Runner], config: RunConfig,
                 feedback: list[Runner] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.runners = runners
        self.feedback = feedback or []
        """BLL: feedback block k (on the same device as forward block k), k < K-1."""
        self.config = config

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
        blocks = config.blocks
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
        if config.is_bll:
            feedback = [open_block(Path(run_dir) / block_dir_name(k) / FEEDBACK_DIR, **load) for k in range(blocks - 1)]
        return cls(run_dir, runners, config, feedback)

    @property
    def is_bll(self) -> bool:
        return bool(self.feedback)

    @property
    def all_runners(self) -> list[Runner]:
        return self.runners + self.feedback

    @property
    def num_blocks(self) -> int:
        return len(self.runners)

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
        data, validation = training_data(data, data_dir, config.limit, config.val_split, self.config.data)
        check_data_fits(data, [r.manifest for r in self.runners], "training data")
        check_cutout(config.cutout, data.arrays()[0].shape, self.config.model)
        batch = self.config.batch_size
        steps_per_epoch = full_batches(len(data), batch)
        total = steps_per_epoch * config.epochs
        base_lr = float(config.lr if config.lr is not None else self.config.lr)
        start = self._start_step(config.resume)
        remove_leftovers([r.block_dir for r in self.all_runners], self.run_dir)
        if start == 0:  # starting over: no earlier checkpoint of the run may be resumed by mistake
            clear_trained([r.block_dir for r in self.all_runners], self.run_dir)
        check_disk_room(self.run_dir, self._checkpoint_bytes())
        stages = self._stages(config, start=start, total=total, steps_per_epoch=steps_per_epoch, base_lr=base_lr)
        began, validating = time.perf_counter(), 0.0
        step = start
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)
        for epoch in range(start // steps_per_epoch, config.epochs):
            for x, labels in data.batches(batch, shuffle=True, seed=config.seed, epoch=epoch, drop_last=True,
                                          start_batch=step - epoch * steps_per_epoch):
                stepped = time.perf_counter()
                x = cutout(x, config.cutout, seed=config.seed, step=step) if config.cutout else x
                # BLL: the feedback pass first, top down (it needs only the labels); its priors feed the forward pass
                priors = {s.index: s.feedback_step(step, labels) for s in reversed(stages) if s.feedback is not None}
                for stage in stages:
                    stage.forward_step(step, labels, x=x if stage.index == 0 else None, prior=priors.get(stage.index))
                took = time.perf_counter() - stepped
                for stage in stages:
                    stage.state.epoch(epoch).seconds += took
                step += 1
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step % steps_per_epoch:
                    self.save(epoch=epoch, stages=stages)
                bar.update()
                top = stages[-1].state.epoch(epoch)
                bar.set_postfix(loss=f"{top.loss / top.samples:.3f}", acc=f"{top.correct / max(top.labelled, 1):.3f}")
            if validation is not None:
                checked = time.perf_counter()
                counts = chain_counts(self.runners, validation, self._eval_send(config.codec, config.granularity,
                                                                                config.group_size), batch_size=batch)
                for stage, count in zip(stages, counts, strict=True):
                    stage.state.validation[epoch] = count
                validating += time.perf_counter() - checked  # not training time: kept out of samples_per_s
            self.save(epoch=epoch + 1, stages=stages)
        bar.close()
        summary = train_summary([s.state for s in stages], run_config=self.config, train=config, base_lr=base_lr,
                                batch=batch, total=total, start=start,
                                seconds=time.perf_counter() - began - validating, transport="inprocess", ranks=1)
        write_json_atomic(self.run_dir / TRAIN_NAME, json.dumps(summary, indent=1))
        return summary

    def _stages(self, config: TrainConfig, *, start: int, total: int, steps_per_epoch: int,
                base_lr: float) -> list[Stage]:
        """The K stages of this process joined by local links; resumed, with the totals kept at step ``start``."""
        up = [LocalLink(k, "activation") for k in range(self.num_blocks - 1)]
        down = [LocalLink(k + 1, "beta message") for k in range(len(self.feedback) - 1)]
        common = dict(train=config, num_classes=int(self.config.num_classes or 0), total=total,
                      steps_per_epoch=steps_per_epoch, base_lr=base_lr)
        return [Stage(runner, self.feedback[k] if k < len(self.feedback) else None,
                      state=StageState.at(runner.block_dir, start),
                      up_in=up[k - 1] if k > 0 else None, up_out=up[k] if k < len(up) else None,
                      down_in=down[k] if k < len(down) else None, down_out=down[k - 1] if 0 < k <= len(down) else None,
                      **common)
                for k, runner in enumerate(self.runners)]

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

    def _checkpoint_bytes(self) -> int:
        return sum(checkpoint_bytes(r.manifest, r.block_dir) for r in self.all_runners)

    def save(self, *, epoch: int, stages: Sequence[Stage] = ()) -> int:
        """Checkpoint every block at their common step, as one: either every block's state of that step is the
        run's checkpoint (``progress.json``), or the previous one stays. Returns the step.

        Weights that are no longer finite, or that give non-finite messages, are refused before anything
        is written, so the last good checkpoint stays. ``stages``: their totals are kept with the
        checkpoint, so that a resumed train.json covers the whole epoch.
        """
        steps = {r.progress["step"] for r in self.all_runners}
        if len(steps) != 1:
            raise TrainingError(f"{self.run_dir}: blocks are at different steps {sorted(steps)}; cannot checkpoint")
        step = steps.pop()
        save_blocks(self.all_runners, step=step, epoch=epoch, run_dir=self.run_dir,
                    extra={folder: kept for s in stages for folder, kept in s.kept_totals(step).items()})
        mark_step(self.run_dir, {"step": step, "epoch": epoch, "transport": "inprocess", "blocks": self.num_blocks})
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
        result_name = "eval.given.json" if data is not None else eval_file_name(self.config.data, data_dir)
        if data is None:
            data = load_run_dataset(self.config.data, "test", data_dir, limit=limit)
        elif limit is not None:
            data = data.subset(limit)
        check_data_fits(data, [r.manifest for r in self.runners], "test data")
        began = time.perf_counter()
        send = self._eval_send(codec, granularity, int(trained.get("group_size", 64)))
        if batch_size is not None and batch_size < 1:
            raise EdgeBLLError(f"the eval batch size must be at least 1, got {batch_size}")
        batch_size = batch_size or self.config.batch_size
        per_block, loss = chain_accuracy(self.runners, data, send, batch_size=batch_size, progress=progress)
        summary = {
            "test_accuracy": per_block[-1], "per_block_accuracy": per_block, "test_loss": loss,
            "samples": len(data), "codec": codec, "granularity": granularity, "method": self.config.method,
            "model": self.config.model, "blocks": self.num_blocks,
            "trained_epochs": self.runners[-1].progress["epoch"], "trained_step": self.runners[-1].progress["step"],
            "batch_size": batch_size,
            "seconds": round(time.perf_counter() - began, 3),
        }
        if result_name != EVAL_NAME:
            summary["result_file"] = result_name  # not the run's own test set: its eval.json stays
        write_json_atomic(self.run_dir / result_name, json.dumps(summary, indent=1))
        return summary

    @staticmethod
    def _eval_send(codec: str, granularity: str, group_size: int) -> Send:
        """How eval-time messages travel: through the codec, not counted, no stochastic rounding."""
        config = TrainConfig(codec=codec, granularity=granularity, group_size=group_size)
        return lambda message, block: message_codec.decode(encode_message(message, config, -1, block))

    def _load_train_summary(self) -> dict[str, Any]:
        path = self.run_dir / TRAIN_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def export_for_inference(self, out_dir: str | os.PathLike) -> list[Path]:
        """One inference ONNX model per block (``x`` -> ``logits``; chain them through the messages)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [r.export_for_inference(out / f"block-{r.index}.onnx") for r in self.runners]
