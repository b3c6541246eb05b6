"""The portable backend: a block's whole training step as one standard-op ONNX graph, run by plain onnxruntime.

The graphs (``portable_train.onnx``, ``portable_eval.onnx``) and the initial state
(``portable_state.npz``) are written by ``edgebll.export.portable``. The train graph takes the
message, the side input, ``lr``, ``step`` and the state (parameters, buffers, AdamW moments) and
returns the block's outputs and the next state. :class:`PortableRunner` keeps that state in
ORT-owned values between steps (nothing of the weights goes through numpy per step) and has the
graph write the next state over it where the export allows (``PortableSchema.in_place``: one copy
of the state, not two). A non-finite loss stops the block with its last saved state, and the
state is saved atomically with the same sidecar as
:class:`~edgebll.runner.BlockRunner`. It needs numpy and the maintained ``onnxruntime`` (aarch64
wheels, NVIDIA's Jetson build) — no training build, no torch.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgebll.errors import EdgeBLLError, ManifestError, TrainingError
from edgebll.manifest import BlockManifest, load_block_manifest
from edgebll.portable_schema import EVAL_FILE, NEXT, STATE_FILE, TRAIN_FILE
from edgebll.checkpoints import TRAINED_DIR
from edgebll.runner import RunnerBase, StepResult, save_trained, session_options, verify_trained

if TYPE_CHECKING:
    from onnxruntime import SessionOptions

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def save_state(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write state tensors as an uncompressed ``.npz`` (numpy reads it on any board)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_state(path: Path, keys: list[str], where: str) -> dict[str, np.ndarray]:
    """Read the ``keys`` of a state file, refusing a missing or malformed one with the key named."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ManifestError(f"{where}: {path.name} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}; "
                                    "hint: re-export the run")
            # np.asarray, not ascontiguousarray: that turns a 0-d buffer (num_batches_tracked) into shape (1,),
            # and onnxruntime then warns at every step that the graph's scalar came back as [1]
            return {k: np.asarray(data[k], order="C") for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ManifestError(f"{where}: cannot read {path} ({exc}); hint: re-export the run, or delete "
                            f"{path.parent / TRAINED_DIR} to start from the exported weights") from exc


def train_session_options(threads: int) -> SessionOptions:
    """:func:`session_options` for a portable step graph: onnxruntime's buffer reuse off.

    With reuse on, onnxruntime's plan hands a freed buffer to a tensor made later, and the buffer
    stays allocated, unused, in between: in a step's backward, which makes tensors of a few sizes
    over and over, those idle buffers were 2-3 activations' worth at the peak
    (benchmarks/alloc_timeline.py). Without it a freed buffer goes back to the arena, and the next
    tensor that fits takes it from there.
    """
    options = session_options(threads)
    options.enable_mem_reuse = False
    return options


class PortableRunner(RunnerBase):
    """Train and evaluate one exported block with plain onnxruntime (the same interface as BlockRunner)."""

    backend = "portable"
    trained_files = (STATE_FILE, "portable_state.json")
    """The files in ``trained/`` that make this block's trained state (the state and its sidecar)."""

    def __init__(self, block_dir: str | os.PathLike, *, threads: int = 0, verify_files: bool = True,
                 load_trained: bool = True, provider: str = "cpu",
                 provider_options: dict[str, str] | None = None) -> None:
        """Load ``block_dir``'s portable graphs; with ``load_trained`` resume from ``trained/portable_state.npz``.

        ``provider``: "cpu", or "cuda" (onnxruntime-gpu, e.g. NVIDIA's build for a Jetson);
        ``provider_options``: that provider's onnxruntime options (CUDA: ``{"use_tf32": "0"}`` for fp32 math).
        """
        import onnxruntime

        self.block_dir = Path(block_dir)
        self.manifest: BlockManifest = load_block_manifest(self.block_dir, verify_files=verify_files)
        where = f"{self.name} ({self.block_dir})"
        schema = self.manifest.portable
        if schema is None:
            raise ManifestError(f"{where}: the block was exported without portable graphs; hint: re-export it with "
                                "`edgebll export --portable` (the default), or train with --backend ort-training")
        self.schema = schema
        if provider not in PROVIDERS:
            raise EdgeBLLError(f"unknown --provider {provider!r}; choose one of {list(PROVIDERS)}")
        available = onnxruntime.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise EdgeBLLError(f"--provider {provider}: this onnxruntime has no {PROVIDERS[provider]} (it has "
                               f"{available}); hint: on a Jetson install NVIDIA's onnxruntime-gpu build for its "
                               "JetPack (see devices/README.md), or use --provider cpu")
        self.device = "cuda" if provider == "cuda" else "cpu"
        providers: list[Any] = [(PROVIDERS[provider], provider_options or {})]
        providers += ["CPUExecutionProvider"] if provider != "cpu" else []
        self.train_session = onnxruntime.InferenceSession(str(self.block_dir / TRAIN_FILE), train_session_options(threads),
                                                          providers=providers)
        self.eval_session = onnxruntime.InferenceSession(str(self.block_dir / EVAL_FILE), session_options(threads),
                                                         providers=providers)
        # onnxruntime falls back to the CPU, with a log line only, when the CUDA provider's libraries do not load
        if PROVIDERS[provider] not in self.train_session.get_providers():
            raise EdgeBLLError(f"--provider {provider}: onnxruntime could not start {PROVIDERS[provider]} (the session "
                               f"runs on {self.train_session.get_providers()}); hint: its CUDA and cuDNN libraries "
                               "must match the onnxruntime-gpu build (see its log lines above), or use --provider cpu")
        self.progress = {"epoch": 0, "step": 0}
        state_file = self.block_dir / STATE_FILE
        trained = self.block_dir / TRAINED_DIR / STATE_FILE
        if load_trained and trained.is_file():
            self.progress = verify_trained(trained)
            state_file = trained
        self._keys = schema.state_keys()
        self._model_keys = schema.model_keys()
        self._ortvalue = onnxruntime.OrtValue
        self._where = where
        self._source: Path | None = state_file
        """The file the state came from or was last saved to: what a non-finite loss rolls back to."""
        self._load(state_file)
        self._spare: dict[str, Any] = {}
        """Where the next step writes the next state: with ``in_place`` the state itself, else the state
        before the last step (two sets in turn, so no step allocates the state anew: per-step
        allocations fragmented ORT's arena by tens of MiB)."""
        outputs = [o.name for o in self.train_session.get_outputs()]
        names = [t.name for t in self.manifest.outputs if t.role != "bn_stat"]
        if outputs != names + [NEXT + k for k in self._keys]:
            raise ManifestError(f"{where}: {TRAIN_FILE} outputs {outputs[:len(names)]} and {len(outputs) - len(names)} "
                                f"state tensors; the manifest says {names} and {len(self._keys)}; hint: re-export the run")
        self._names = names
        self._read_roles()  # BatchNorm statistics come last among the outputs: the roles' positions hold

    def _load(self, path: Path) -> None:
        arrays = load_state(path, self._keys, self._where)
        self.state = {k: self._ortvalue.ortvalue_from_numpy(a, self.device, 0) for k, a in arrays.items()}

    def _roll_back(self) -> str:
        """After a failed in-place step: the state of ``_source`` again; says what happened, for the error."""
        if self._source is None:
            return "the step had written over its state, which was given as arrays: load a state again"
        self._load(self._source)
        self._spare = {}
        self.progress = verify_trained(self._source) if self._source.parent.name == TRAINED_DIR else {"epoch": 0, "step": 0}
        return (f"the step had written over its state, so it went back to {self._source.parent.name}/"
                f"{self._source.name} (step {self.progress['step']})")

    def _run(self, session: Any, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
        """Run ``session`` on OrtValues; the block's own outputs come back on the CPU, the state stays on the
        device (written into ``_spare`` where it has a tensor of that key)."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            spare = self._spare.get(name[len(NEXT):]) if name.startswith(NEXT) else None
            if spare is not None:
                binding.bind_ortvalue_output(name, spare)
            else:
                binding.bind_output(name, self.device if name.startswith(NEXT) else "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _feeds(self, x: np.ndarray, side: np.ndarray) -> dict[str, Any]:
        self._check_inputs(x, side)
        return {self._inputs[0].name: self._ortvalue.ortvalue_from_numpy(x, self.device, 0),
                self._inputs[1].name: self._ortvalue.ortvalue_from_numpy(side, self.device, 0)}

    def train_step(self, x: np.ndarray, side: np.ndarray, lr: float) -> StepResult:
        """One local step: forward, local loss, backward and optimizer update, all in one graph run.

        A non-finite loss raises TrainingError and leaves no update: the next state is adopted only
        when the loss is finite, or, where the graph writes it in place, the runner goes back to the
        state it last loaded or saved (the error says which step that was).
        """
        feeds = self._feeds(x, side)
        feeds["lr"] = self._ortvalue.ortvalue_from_numpy(np.array(lr, np.float32), self.device, 0)
        feeds["step"] = self._ortvalue.ortvalue_from_numpy(np.array(self.progress["step"] + 1, np.float32),
                                                           self.device, 0)
        feeds |= self.state
        if self.schema.in_place:
            self._spare = self.state
        values = self._run(self.train_session, feeds, self._names + [NEXT + k for k in self._keys])
        outputs = tuple(v.numpy() for v in values[:len(self._names)])
        loss = float(outputs[self._loss_at])
        if not np.isfinite(loss):
            at = f"at step {self.progress['step']} (epoch {self.progress['epoch']})"
            undone = self._roll_back() if self.schema.in_place else "stopped before the optimizer step"
            raise TrainingError(f"{self.name}: local loss is {loss} {at}; {undone}; hint: lower the learning rate "
                                "(--lr)")
        # a key written into a spare tensor keeps that very object: the values ORT hands back for it
        # do not own the memory (a numpy-backed spare would be freed under them)
        updated = {k: self._spare.get(k, v) for k, v in zip(self._keys, values[len(self._names):])}
        if not self.schema.in_place:
            # the old state becomes the next step's output buffers, where its shapes are the graph's
            self._spare = {k: v for k, v in self.state.items() if v.shape() == updated[k].shape()}
        self.state = updated
        self.progress["step"] += 1
        self.last_inputs = (x, side)
        return self._result(outputs)

    def eval_step(self, x: np.ndarray, side: np.ndarray) -> StepResult:
        """Forward in eval mode (BatchNorm uses running statistics); no update."""
        feeds = self._feeds(x, side) | {k: self.state[k] for k in self._model_keys}
        values = self._run(self.eval_session, feeds, self._names)
        return self._result(tuple(v.numpy() for v in values))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """A numpy copy of every state tensor, under its graph key (``param:NAME``, ``exp_avg:NAME``, …)."""
        return {k: np.array(v.numpy()) for k, v in self.state.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray], step: int) -> None:
        """Continue from ``arrays`` (what ``state_arrays`` returned, here or on another machine) as after ``step``
        steps: the next step is ``step + 1`` (AdamW's bias correction counts it)."""
        if sorted(arrays) != sorted(self._keys):
            raise EdgeBLLError(f"{self.name}: a state needs exactly the keys {self._keys[:3]}…, got {sorted(arrays)[:3]}…")
        declared = {i.name: i.shape for i in self.train_session.get_inputs()}
        wrong = [k for k in self._keys if list(arrays[k].shape) != declared[k]]
        if wrong:
            raise EdgeBLLError(f"{self.name}: state {wrong[0]} has shape {list(arrays[wrong[0]].shape)}, the graph "
                               f"takes {declared[wrong[0]]}")
        self.state = {k: self._ortvalue.ortvalue_from_numpy(np.array(arrays[k], order="C"), self.device, 0)
                      for k in self._keys}
        self._spare = {}
        self._source = None
        self.progress["step"] = int(step)

    def parameters(self) -> dict[str, np.ndarray]:
        """A copy of every parameter and buffer, by the torch module's names."""
        arrays = self.state_arrays()
        return {key.split(":", 1)[1]: arrays[key] for key in self._model_keys}

    def save(self, *, epoch: int) -> Path:
        """Write ``trained/portable_state.npz`` atomically (temp file, fsync, rename), with the optimizer state."""
        self.progress["epoch"] = epoch
        arrays = self.state_arrays()
        self._source = save_trained(self.block_dir / TRAINED_DIR / STATE_FILE, self.progress,
                                    lambda tmp: save_state(tmp, arrays))
        return self._source

    def export_for_inference(self, path: str | os.PathLike) -> Path:
        """A plain ONNX inference model (input ``x``; outputs ``logits`` and, but for the last block, ``y``).

        The portable eval graph with the current weights and BatchNorm statistics baked in as
        initializers, pruned to what those outputs need. Needs the ``onnx`` package (a board without
        it: ``pip install onnx``).
        """
        try:
            import onnx
            from onnx import numpy_helper, utils
        except ImportError as exc:
            raise EdgeBLLError(f"{self.name}: writing an inference model needs the onnx package ({exc}); hint: "
                               "pip install onnx") from exc
        model = onnx.load(str(self.block_dir / EVAL_FILE))
        arrays = {k: self.state[k].numpy() for k in self._model_keys}  # not the optimizer state
        baked = set(arrays)
        kept = [value for value in model.graph.input if value.name not in baked]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.graph.initializer.extend(numpy_helper.from_array(arrays[k], name=k) for k in self._model_keys)
        wanted = ["logits"] + ([self._names[self._message_at]] if self._message_at is not None else [])
        pruned = utils.Extractor(model).extract_model([self._inputs[0].name], wanted)
        onnx.checker.check_model(pruned)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(pruned, path)
        return path
