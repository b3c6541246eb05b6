"""Estimate the peak memory of training one block on a device, from its artifact folder alone.

    from edgebll.memory import estimate_peak_bytes
    estimate = estimate_peak_bytes("runs/a/block-0", batch_size=64)
    estimate.total, estimate.parts()     # bytes, and where they go

The estimate is the resident memory a training process adds on top of an idle interpreter that
has imported ONNX Runtime (what ``edgebll profile`` measures), in seven parts:

- ``parameters``: every float in the checkpoint state (weights and BatchNorm statistics);
- ``gradients``: ORT's gradient accumulation buffer of every trainable parameter;
- ``optimizer_state``: AdamW's two moments per trainable parameter (SGD: none);
- ``activations``: the most bytes the training graph holds at once, from a liveness walk over its
  nodes with every tensor's shape from ONNX shape inference at ``batch_size``: what the forward
  keeps for the backward, the gradients flowing back, and the outputs returned to Python;
- ``allocator``: what ONNX Runtime's CPU arena holds beyond that. Its best-fit arena serves a
  request from a free chunk up to twice as large and never hands memory back, so a few steps
  leave a fixed fraction more resident (:data:`ARENA_OVERHEAD`). With ORT's memory pattern on,
  the second step also allocates one block for the whole recorded plan while the first step's
  chunks stay in the arena: nearly one more ``activations`` (:data:`PATTERN_COPY`). When an arena
  region left free by the first step is large enough, ORT puts that block there instead, and the
  estimate is high (seen for resnet18 trained whole: +45 %);
- ``messages``: the decoded input, the frame it came in, the frame sent on, and the encoder's
  float32 scratch when the codec runs in numpy;
- ``runtime``: ONNX Runtime's own sessions and first step (:data:`RUNTIME_BYTES`).

``runtime`` differs from CPU to CPU by up to :data:`RUNTIME_SPREAD` of itself (mostly ORT's code
pages; see there), which matters for tiny blocks only.

``RUNTIME_BYTES``, ``ARENA_OVERHEAD`` and ``PATTERN_COPY`` were measured, never fitted per
block: ``benchmarks/memory.py`` takes the first from the blocks of a tiny model and the other two
from batch-size sweeps of one model (cnn-small) with the memory pattern on and off, and writes
``benchmarks/results/memory.json``. Everything else comes from the graph.

The portable backend (``backend="portable"``) is estimated from ``portable_train.onnx`` the same
way: ``parameters`` and ``optimizer_state`` are the state it is fed, ``gradients`` is 0 (they are
transient tensors of the one graph, inside ``activations``). A graph exported to update in place
(``PortableSchema.in_place``) writes the next state over the current one, so ``activations``
leave it out; an older export's include it, since the runner then holds both.

Needs the ``onnx`` package (imported by :mod:`edgebll.graph_memory`, when an estimate is made); it
comes with onnxruntime-training as a dependency on the host; a board with plain onnxruntime
installs it for estimates (``pip install onnx``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebll import codec as message_codec
from edgebll.errors import EdgeBLLError, ManifestError
from edgebll.graph_memory import graph_memory
from edgebll.links import ENVELOPE
from edgebll.manifest import MANIFEST_NAME, BlockManifest, load_block_manifest
from edgebll.portable_schema import EVAL_FILE, TRAIN_FILE
from edgebll.runner import session_options

RUNTIME_BYTES = int(12.4 * 2**20)
"""ONNX Runtime's own memory for one block: three sessions (training, eval, optimizer) and the
first steps' fixed allocations, above an idle interpreter with ORT imported. Measured on x86-64 on
the blocks of a tiny model, which hold almost nothing else (benchmarks/results/memory.json,
calibration.runtime_bytes); re-measure on a board with benchmarks/memory.py."""

ARENA_OVERHEAD = 0.27
"""Fraction of the activations' peak that the CPU arena holds on top of it after a few steps,
memory pattern off: the calibration slope less one (benchmarks/results/memory.json)."""

PATTERN_COPY = 0.89
"""What ORT's memory pattern adds, as a fraction of the activations' peak: the difference of the
calibration slopes with the pattern on and off (benchmarks/results/memory.json)."""

PORTABLE_RUNTIME_BYTES = int(13.6 * 2**20)
"""RUNTIME_BYTES of the portable backend: two inference sessions of the standard-op graphs
(benchmarks/results/memory_portable.json, calibration.runtime_bytes)."""

PORTABLE_ARENA_OVERHEAD = 0.16
"""ARENA_OVERHEAD of the portable backend (benchmarks/results/memory_portable.json)."""

RUNTIME_SPREAD = 0.3
"""How far the ``runtime`` part measured on one x86-64 CPU can be from the constants, measured on
another: the same tiny BLL feedback block measured 9.6 MiB on one machine, 11.4 MiB on a second
(AMD EPYC, no AVX-512) and 12.4 MiB where RUNTIME_BYTES was calibrated. Most of it is ONNX
Runtime's code touched by the first steps (file-backed pages: ``file_backed_bytes`` of a
measurement, 8.9 of those 11.4 MiB), and ORT picks its kernels per instruction set. A tiny block's
estimate is therefore good to this fraction of ``runtime`` plus the usual error of the rest."""


@dataclass(kw_only=True, slots=True, frozen=True)
class MemoryEstimate:
    """Peak resident memory of training one block, in bytes, part by part (see the module docstring)."""

    batch_size: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    allocator: int
    messages: int
    runtime: int
    saved_for_backward: int = 0
    """The part of ``activations`` that the forward keeps for the backward (for information)."""
    guessed_shapes: tuple[str, ...] = field(default=())
    """Tensors whose shape inference failed and that were sized like their op's first input."""

    PARTS = ("parameters", "gradients", "optimizer_state", "activations", "allocator", "messages", "runtime")

    @property
    def total(self) -> int:
        """The estimated peak: the sum of the parts."""
        return sum(self.parts().values())

    def parts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.PARTS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.parts(), "total": self.total, "batch_size": self.batch_size,
                "saved_for_backward": self.saved_for_backward, "guessed_shapes": list(self.guessed_shapes)}


def estimate_peak_bytes(block: str | os.PathLike, batch_size: int | None = None, *, codec: str = "int8",
                        codec_backend: str = "auto", memory_pattern: bool | None = None,
                        manifest: BlockManifest | None = None, in_flight: int = 0,
                        validation: bool = False, backend: str = "ort-training", frozen: bool = False) -> MemoryEstimate:
    """Estimate the peak memory of training the block in ``block`` (its folder or its manifest.json).

    ``batch_size`` defaults to the one it was exported with. ``codec`` is the message codec
    between blocks ("fp32" counts as no quantization); ``codec_backend`` "auto" looks whether the
    native codec is built. ``memory_pattern`` is whether ORT's memory pattern is on; None: as
    :class:`~edgebll.runner.BlockRunner` configures its sessions. ``manifest``: the block's
    manifest when it is not written yet (the exporter's case); only training_model.onnx is read.
    ``in_flight``: the MPI transport's ``--max-in-flight``; each link of the block then holds up to
    that many frames (with their envelopes) besides the ones counted in ``messages`` (0: in process).
    ``validation``: the MPI run validates (``--val-split``), so a forward block's links have a
    second ring of that many frames, for the held-out batches (the same batch size).
    ``backend``: "ort-training" reads training_model.onnx, "portable" portable_train.onnx.
    ``frozen``: the block does not train (``--freeze-blocks``): its eval graph (eval_model.onnx or
    portable_eval.onnx) with its weights, no gradients, no optimizer state.
    """
    block_dir = Path(block)
    if block_dir.name == MANIFEST_NAME:
        block_dir = block_dir.parent
    if manifest is None:
        manifest = load_block_manifest(block_dir, verify_files=False)
    batch = manifest.batch_size if batch_size is None else int(batch_size)
    if batch < 1:
        raise EdgeBLLError(f"batch size must be at least 1, got {batch}")
    if memory_pattern is None:
        memory_pattern = runner_uses_memory_pattern()
    if frozen and backend in ("ort-training", "portable"):
        graph = graph_memory(block_dir / (EVAL_FILE if backend == "portable" else "eval_model.onnx"), manifest, batch)
        optimizer_state = 0
    elif backend == "portable":
        if manifest.portable is None:
            raise ManifestError(f"block {manifest.index}: exported without portable graphs; hint: re-export the run "
                                "with --portable (the default)")
        graph = graph_memory(block_dir / TRAIN_FILE, manifest, batch,
                              optimizer_keys=frozenset(manifest.portable.state_keys()[len(manifest.portable.model_keys()):]),
                              in_place=manifest.portable.in_place)
        optimizer_state = graph.optimizer_state  # the AdamW moments it is fed (none for SGD)
    elif backend == "ort-training":
        graph = graph_memory(block_dir / "training_model.onnx", manifest, batch)
        adamw = str(manifest.optimizer.get("type", "adamw")).lower() == "adamw"
        optimizer_state = 2 * graph.gradients if adamw else 0
    else:
        raise EdgeBLLError(f"unknown backend {backend!r}; choose 'ort-training' or 'portable'")
    overhead = PORTABLE_ARENA_OVERHEAD if backend == "portable" else ARENA_OVERHEAD
    arena = (overhead + (PATTERN_COPY if memory_pattern else 0.0)) * graph.peak
    return MemoryEstimate(
        batch_size=batch,
        parameters=graph.parameters,
        gradients=graph.gradients,
        optimizer_state=optimizer_state,
        activations=graph.peak,
        allocator=int(arena),
        messages=message_bytes(manifest, batch, codec=codec, backend=codec_backend)
        + in_flight * link_frame_bytes(manifest, batch, codec=codec)
        * (2 if validation and getattr(manifest, "kind", "forward") == "forward" else 1),
        runtime=PORTABLE_RUNTIME_BYTES if backend == "portable" else RUNTIME_BYTES,
        saved_for_backward=graph.saved,
        guessed_shapes=tuple(graph.guessed),
    )


def runner_uses_memory_pattern() -> bool:
    """Whether BlockRunner's sessions run with ORT's memory pattern (edgebll turns it off; ORT's default is on)."""
    return bool(session_options(0).enable_mem_pattern)


def message_bytes(manifest: BlockManifest, batch_size: int, *, codec: str = "int8", backend: str = "auto") -> int:
    """Buffers of the messages in and out of one block during a step (see the module docstring)."""

    def floats(spec: Any) -> int:
        return batch_size * math.prod(int(d) for d in spec.per_sample_shape())

    numpy_backend = backend == "numpy" or (backend == "auto" and not message_codec.native_available())
    total = 0
    for spec in manifest.inputs:  # what the block is fed: decoded (float32) or given (labels, targets)
        total += floats(spec) * np.dtype(spec.dtype).itemsize
        from_data = manifest.index == 0 and getattr(manifest, "kind", "forward") == "forward"
        if spec.role == "message" and not from_data:  # it arrived as a frame
            total += _frame_nbytes([batch_size, *spec.per_sample_shape()], codec)
    sent = manifest.output("message")
    if sent is not None:
        frame = _frame_nbytes([batch_size, *sent.per_sample_shape()], codec)
        # the frame is built in a bytearray and returned as bytes (one copy); numpy's int encoders
        # first compute a float32 ratio the size of the message
        scratch = 4 * floats(sent) if numpy_backend and codec.startswith("int") else frame
        total += frame + scratch
    return total


def link_frame_bytes(manifest: BlockManifest, batch_size: int, *, codec: str = "int8") -> int:
    """One frame in flight on each MPI link of the block: the message it receives and the one it sends.

    Counts what :mod:`edgebll.links` posts per unit of ``--max-in-flight``: an envelope plus a frame,
    per link (per-tensor scales; other granularities add a few scales).
    """
    total = 0
    receives = manifest.index > 0 if manifest.kind == "forward" else manifest.index < manifest.num_blocks - 2
    spec = manifest.input("message")
    if receives and spec is not None:
        total += ENVELOPE.size + _frame_nbytes([batch_size, *spec.per_sample_shape()], codec)
    sent = manifest.output("message")
    if sent is not None:
        total += ENVELOPE.size + _frame_nbytes([batch_size, *sent.per_sample_shape()], codec)
    return total


def _frame_nbytes(shape: list[int], codec: str) -> int:
    try:
        return int(message_codec.frame_nbytes(shape, codec))
    except EdgeBLLError as exc:
        raise EdgeBLLError(f"codec {codec!r}: {exc}") from exc
