"""``BlockRunner``: one block's ORT training session — a thin wrapper over CheckpointState/Module/Optimizer.

The runner validates its manifest (and the files' hashes) before loading, checks every input
against the manifest, stops on a non-finite loss before the optimizer step, writes BatchNorm
running statistics back into the checkpoint state after each step, and saves atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgebll.checkpoints import TRAINED_DIR, TRAINED_FILES, TRAINED_STATE, sidecar_of
from edgebll.errors import EdgeBLLError, ManifestError, TrainingError
from edgebll.json_files import write_json_atomic
from edgebll.manifest import BlockManifest, TensorSpec, load_block_manifest, sha256_file
from edgebll.ort_training import training_api, training_available

if TYPE_CHECKING:  # onnxruntime loads only after the training build's package is registered (session_options)
    from onnxruntime import SessionOptions


@dataclass(slots=True)
class StepResult:
    """What one train or eval step returns."""

    loss: float
    logits: np.ndarray
    """[B, classes] scores of the block's local head (the classifier for the last block)."""
    message: np.ndarray | None
    """[B, ...] activation for the next block (for a feedback block: beta for the one below); None for the last."""
    metric: float | None = None
    """A reported, undifferentiated quantity (BLL: the KL between posterior and forward distribution)."""


class RunnerBase:
    """What both backends' runners share: the manifest's roles, the input checks, names and results."""

    block_dir: Path
    manifest: BlockManifest

    def _read_roles(self) -> None:
        """Where the loss, logits, message and metric are among the outputs; refuse anything but two inputs."""
        roles = [t.role for t in self.manifest.outputs]
        self._loss_at = roles.index("loss")
        self._logits_at = roles.index("logits")
        self._message_at = roles.index("message") if "message" in roles else None
        self._metric_at = roles.index("metric") if "metric" in roles else None
        self._inputs = self.manifest.inputs
        if len(self._inputs) != 2:
            raise ManifestError(f"{self.name} ({self.block_dir}): expected 2 inputs (message and side input), "
                                f"the manifest lists {[t.name for t in self._inputs]}")

    @property
    def index(self) -> int:
        return self.manifest.index

    @property
    def name(self) -> str:
        """"block k" or "feedback block k", for messages."""
        return f"{'feedback ' if self.manifest.kind == 'feedback' else ''}block {self.index}"

    def _check_inputs(self, *arrays: np.ndarray) -> None:
        check_step_inputs(self.name, self.block_dir, self._inputs, *arrays)

    last_inputs: tuple[np.ndarray, np.ndarray] | None = None
    """The inputs of the last train step (references, not copies): a checkpoint probes the new weights on them."""

    def nonfinite_outputs(self) -> str | None:
        """Which outputs of an eval forward of the last trained batch, with the weights as they are now, are not
        finite ("message", "logits"); None when all are, or when the block has not trained since it was opened.

        A step's own outputs come from the weights before its update: finite weights can still send
        non-finite messages on the next step. Checked before a checkpoint keeps such weights.
        """
        if self.last_inputs is None:
            return None
        result = self.eval_step(*self.last_inputs)  # type: ignore[attr-defined]
        bad = [name for name, value in (("message", result.message), ("logits", result.logits))
               if value is not None and not np.all(np.isfinite(value))]
        return " and ".join(bad) or None

    def frozen_step(self, x: np.ndarray, side: np.ndarray) -> StepResult:
        """A step of a frozen block (``--freeze-blocks``): its eval graph (BatchNorm on its running statistics), no
        update; the step still counts, so a frozen block checkpoints and resumes in step with the others."""
        result = self.eval_step(x, side)  # type: ignore[attr-defined]
        self.progress["step"] += 1  # type: ignore[attr-defined]
        return result

    def _result(self, outputs: tuple[np.ndarray, ...]) -> StepResult:
        message = outputs[self._message_at] if self._message_at is not None else None
        metric = float(outputs[self._metric_at]) if self._metric_at is not None else None
        return StepResult(float(outputs[self._loss_at]), outputs[self._logits_at], message, metric)


class BlockRunner(RunnerBase):
    """Train and evaluate one exported block on this device with onnxruntime-training's API."""

    backend = "ort-training"
    trained_files = ("checkpoint", "checkpoint.json")
    """The files in ``trained/`` that make this block's trained state (the checkpoint and its sidecar)."""

    def __init__(self, block_dir: str | os.PathLike, *, threads: int = 0, verify_files: bool = True,
                 load_trained: bool = True) -> None:
        """Load ``block_dir``; with ``load_trained`` resume from ``trained/checkpoint`` when it exists.

        ``threads``: intra-op threads for ORT (0 lets ORT choose).
        """
        self.block_dir = Path(block_dir)
        self.manifest: BlockManifest = load_block_manifest(self.block_dir, verify_files=verify_files)
        api = training_api()
        options = session_options(threads)
        self.progress = {"epoch": 0, "step": 0}
        checkpoint = self.block_dir / "checkpoint"
        trained = self.block_dir / TRAINED_DIR / "checkpoint"
        if load_trained and trained.is_file():
            self.progress = verify_trained(trained)
            checkpoint = trained
        self.state = api.CheckpointState.load_checkpoint(str(checkpoint))
        self.module = api.Module(str(self.block_dir / "training_model.onnx"), self.state,
                                 str(self.block_dir / "eval_model.onnx"), session_options=options)
        self.optimizer = api.Optimizer(str(self.block_dir / "optimizer_model.onnx"), self.module)
        names = self.module.output_names()
        expected = [t.name for t in self.manifest.outputs]
        if names != expected:
            raise ManifestError(f"block {self.index} ({self.block_dir}): training graph outputs {names}, manifest says "
                                f"{expected}; hint: re-export the run")
        self._read_roles()
        self._stats = [(names.index(s.output), s) for s in self.manifest.bn_stats]

    def train_step(self, x: np.ndarray, side: np.ndarray, lr: float) -> StepResult:
        """One local step: forward, local loss, backward, optimizer update at learning rate ``lr``.

        ``x`` is the message in; ``side`` the block's second input: the labels (bwbpf, bp), the
        prior m * b_k (a BLL forward block) or the one-hot target (a BLL feedback block).
        """
        self._check_inputs(x, side)
        self.module.train()
        outputs = self.module(x, side)
        loss = float(outputs[self._loss_at])
        if not np.isfinite(loss):
            self.module.lazy_reset_grad()  # discard this step's gradients
            raise TrainingError(f"{self.name}: local loss is {loss} at step {self.progress['step']} "
                                f"(epoch {self.progress['epoch']}); stopped before the optimizer step; "
                                "hint: lower the learning rate (--lr)")
        self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()  # the next backward overwrites instead of accumulating
        self._write_back_batchnorm(outputs, batch=x.shape[0])
        self.progress["step"] += 1
        self.last_inputs = (x, side)
        return self._result(outputs)

    def eval_step(self, x: np.ndarray, side: np.ndarray) -> StepResult:
        """Forward in eval mode (BatchNorm uses running statistics); no update."""
        self._check_inputs(x, side)
        self.module.eval()
        return self._result(self.module(x, side))

    def _write_back_batchnorm(self, outputs: tuple[np.ndarray, ...], batch: int) -> None:
        """Copy the updated running statistics into the state (ORT would keep the old ones forever).

        ORT updates the running variance with the biased batch variance; torch uses the unbiased
        one, so rescale the batch part by n/(n-1) with n = batch * H * W.
        """
        params = self.state.parameters
        for at, stat in self._stats:
            new = outputs[at]
            if stat.kind == "var":
                n = batch * stat.spatial
                old = params[stat.parameter].data
                new = stat.momentum * old + (new - stat.momentum * old) * (n / max(n - 1, 1))
            params[stat.parameter] = np.ascontiguousarray(new, dtype=np.float32)

    def parameters(self) -> dict[str, np.ndarray]:
        """A copy of every parameter and buffer in the checkpoint state."""
        return {name: np.array(p.data) for name, p in self.state.parameters}

    def save(self, *, epoch: int) -> Path:
        """Write ``trained/checkpoint`` atomically (temp file, fsync, rename), with the optimizer state."""
        api = training_api()
        self.progress["epoch"] = epoch
        return save_trained(self.block_dir / TRAINED_DIR / "checkpoint", self.progress,
                            lambda tmp: api.CheckpointState.save_checkpoint(self.state, str(tmp),
                                                                            include_optimizer_state=True))

    def export_for_inference(self, path: str | os.PathLike) -> Path:
        """A plain ONNX inference model (input ``x``; outputs ``logits`` and, but for the last block, ``y``)."""
        names = [t.name for t in self.manifest.outputs]
        wanted = ["logits"] + ([names[self._message_at]] if self._message_at is not None else [])
        self.module.export_model_for_inferencing(str(path), wanted)
        return Path(path)


def check_step_inputs(name: str, block_dir: Path, specs: list[TensorSpec], *arrays: np.ndarray) -> None:
    """Refuse a step's inputs whose dtype or per-sample shape is not the manifest's, or whose batches differ."""
    where = f"{name} ({block_dir})"
    batch = arrays[0].shape[0] if arrays[0].ndim else None
    for spec, array in zip(specs, arrays):
        if array.dtype != np.dtype(spec.dtype):
            raise TrainingError(f"{where}: input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        want = spec.per_sample_shape()
        if array.ndim != len(want) + 1 or list(array.shape[1:]) != want or array.shape[0] != batch:
            raise TrainingError(f"{where}: input {spec.name!r} has shape {list(array.shape)} but the block takes "
                                f"[{', '.join(map(str, [batch, *want]))}]; hint: the previous block and this one "
                                "come from different exports; re-export both with the same --blocks")


def session_options(threads: int) -> SessionOptions:
    """ORT session options of every block: ``threads`` intra-op threads (0: ORT decides)."""
    if training_available():
        training_api()  # registers the torch-free onnxruntime.training package before onnxruntime loads
    from onnxruntime import SessionOptions

    if threads < 0:
        raise EdgeBLLError(f"--threads must be >= 0 (0: onnxruntime decides), got {threads}")
    options = SessionOptions()
    options.intra_op_num_threads = threads
    # Worker threads spin between the ops of a step (ORT's default): woken from sleep for each of a
    # step's ~1000 ops, they made a portable cnn-small block's step at two threads 9-16 % slower
    # (median of 30 interleaved pairs per block; faster with spinning in 80-90 % of the pairs). They
    # stop spinning when the step ends, so between steps they burn no core another block or the
    # message codec needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # ORT's memory pattern pre-plans a second arena for the activations: 24-43 % more peak memory
    # for no measurable speed (benchmarks/results/memory.json). Memory is what a board lacks.
    options.enable_mem_pattern = False
    return options


def save_trained(final: Path, progress: dict[str, int], write: Callable[[Path], None]) -> Path:
    """Write a trained state to ``final`` through ``write(tmp)``, atomically, with its sidecar (``sidecar_of``).

    The temp file is fsync'd before the rename. Two files cannot be replaced at once: the sidecar
    goes first and names both the new state and the one still in place, so a crash between the two
    renames leaves a complete pair either way.
    """
    final.parent.mkdir(exist_ok=True)
    tmp, sidecar = final.with_name(f".{final.name}.tmp"), sidecar_of(final)
    previous = _read_sidecar(sidecar) if final.is_file() else None
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        info = {**progress, "sha256": sha256_file(tmp)}
        if previous is not None:
            info["previous"] = {k: previous[k] for k in ("epoch", "step", "sha256")}
        write_json_atomic(sidecar, json.dumps(info))
    except BaseException:  # a full disk, an interrupt: no half-written state stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    # the other backend's state (a run trained on one backend, then the other) is now stale: a
    # later `auto` must find this one only
    for name in TRAINED_FILES:
        if name not in (final.name, sidecar.name):
            (final.parent / name).unlink(missing_ok=True)
    return final


def _read_sidecar(sidecar: Path) -> dict | None:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def trained_step(block_dir: Path) -> int | None:
    """The step a block's trained state holds, checked against its sidecar (None: not trained)."""
    for name in TRAINED_STATE.values():
        if (block_dir / TRAINED_DIR / name).is_file():
            return verify_trained(block_dir / TRAINED_DIR / name)["step"]
    return None


def verify_trained(checkpoint: Path) -> dict[str, int]:
    """The progress (epoch, step) of a trained state file, checked against its sidecar's sha256."""
    sidecar = sidecar_of(checkpoint)
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{checkpoint}: no readable {sidecar.name} ({exc}); hint: delete {checkpoint.parent} to "
                            "start from the exported weights") from exc
    got = sha256_file(checkpoint)
    if got != info.get("sha256"):
        info = info.get("previous") or {}  # the save was interrupted before its checkpoint replaced this one
        if got != info.get("sha256"):
            raise ManifestError(f"{checkpoint}: sha256 does not match {sidecar.name}; the file was modified; hint: "
                                f"delete {checkpoint.parent} to start from the exported weights")
    return {"epoch": int(info["epoch"]), "step": int(info["step"])}
