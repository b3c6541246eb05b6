"""``FrozenRunner``: a block that does not train (``--freeze-blocks``), held as a device holds an inference model.

Fine-tuning the top of a pretrained run leaves the lower blocks as they are. Such a block needs
its forward pass only, so it loads its eval graph (``eval_model.onnx`` of the training build, or
the portable ``portable_eval.onnx``) into a plain ONNX Runtime session and its weights and
BatchNorm statistics as values fed to it: no training graph, no gradient buffers, no optimizer
state in memory. Its checkpoint is the state file it was loaded from, copied byte for byte (with
the optimizer state it held, so that training it later goes on where it stopped), under the
step the run has reached: a frozen block checkpoints and resumes in step with the others.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgebll.checkpoints import TRAINED_DIR, TRAINED_STATE, sidecar_of
from edgebll.errors import EdgeBLLError, ManifestError
from edgebll.manifest import BlockManifest, load_block_manifest
from edgebll.ort_training import training_api
from edgebll.portable import PROVIDERS, load_state
from edgebll.portable_schema import EVAL_FILE
from edgebll.runner import RunnerBase, StepResult, save_trained, session_options, verify_trained

EVAL_GRAPHS = {"ort-training": "eval_model.onnx", "portable": EVAL_FILE}
"""The eval graph a frozen block runs, by the backend whose state it holds."""


class FrozenRunner(RunnerBase):
    """One block's forward pass on its eval graph with fixed weights (the interface of the training runners)."""

    def __init__(self, block_dir: str | os.PathLike, *, backend: str, threads: int = 0, verify_files: bool = True,
                 load_trained: bool = True, provider: str = "cpu") -> None:
        """Load ``block_dir`` frozen on ``backend`` ("ort-training" or "portable": whose state format and eval graph
        it uses); with ``load_trained`` from its ``trained/`` state."""
        import onnxruntime

        if backend not in EVAL_GRAPHS:
            raise EdgeBLLError(f"a frozen block runs on 'ort-training' or 'portable', got {backend!r}")
        self.block_dir = Path(block_dir)
        self.manifest: BlockManifest = load_block_manifest(self.block_dir, verify_files=verify_files)
        self.backend = backend
        state_name, graph_name = TRAINED_STATE[backend], EVAL_GRAPHS[backend]
        self.trained_files = (state_name, sidecar_of(Path(state_name)).name)
        self.progress = {"epoch": 0, "step": 0}
        self._source = self.block_dir / state_name
        trained = self.block_dir / TRAINED_DIR / state_name
        if load_trained and trained.is_file():
            self.progress = verify_trained(trained)
            self._source = trained
        self._weights = self._read_weights()
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        self.session = onnxruntime.InferenceSession(str(self.block_dir / graph_name), session_options(threads),
                                                    providers=providers)
        self._read_roles()
        self._names = [o.name for o in self.session.get_outputs()]
        fed = [i.name for i in self.session.get_inputs()][2:]
        missing = [name for name in fed if name not in self._weights]
        if missing:
            raise ManifestError(f"{self.name} ({self.block_dir}): {graph_name} takes {missing[:3]}, which "
                                f"{self._source.name} lacks; hint: re-export the run")
        self._feeds = {name: onnxruntime.OrtValue.ortvalue_from_numpy(self._weights[name]) for name in fed}

    def _read_weights(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by the names the eval graph takes (nothing of the optimizer state is kept)."""
        if self.backend == "portable":
            if self.manifest.portable is None:
                raise ManifestError(f"{self.name} ({self.block_dir}): exported without portable graphs; hint: "
                                    "--backend ort-training, or re-export the run")
            return load_state(self._source, self.manifest.portable.model_keys(), f"{self.name} ({self.block_dir})")
        state = training_api().CheckpointState.load_checkpoint(str(self._source))
        return {name: np.array(p.data) for name, p in state.parameters}

    def train_step(self, x: np.ndarray, side: np.ndarray, lr: float) -> StepResult:
        raise EdgeBLLError(f"{self.name} was loaded frozen (freeze_blocks): it does not train; hint: load the run "
                           "again without freezing it")

    def eval_step(self, x: np.ndarray, side: np.ndarray) -> StepResult:
        """Forward in eval mode (BatchNorm on its running statistics)."""
        self._check_inputs(x, side)
        outputs = self.session.run(None, {self._inputs[0].name: x, self._inputs[1].name: side} | self._feeds)
        by_name = dict(zip(self._names, outputs))
        return self._result(tuple(by_name.get(t.name) for t in self.manifest.outputs))

    def parameters(self) -> dict[str, np.ndarray]:
        """A copy of every parameter and buffer, by the torch module's names."""
        return {name.split(":", 1)[-1]: np.array(value) for name, value in self._weights.items()}

    def save(self, *, epoch: int) -> Path:
        """The state it was loaded from, copied byte for byte as ``trained/`` at the run's step (atomically)."""
        self.progress["epoch"] = epoch
        source = self._source
        self._source = save_trained(self.block_dir / TRAINED_DIR / self.trained_files[0], self.progress,
                                    lambda tmp: shutil.copyfile(source, tmp))
        return self._source

    def export_for_inference(self, path: str | os.PathLike) -> Any:
        raise EdgeBLLError(f"{self.name} was loaded frozen; hint: load the run without freeze_blocks to export it")
