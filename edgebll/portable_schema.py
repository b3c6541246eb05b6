"""The portable graphs' part of the artifact contract: their file names, opset and state layout.

A block exported with ``--portable`` trains as one standard-op graph on plain onnxruntime
(:mod:`edgebll.portable`); its manifest's ``portable`` entry is a :class:`PortableSchema`, which
names every state tensor the graphs take, by key (``param:NAME``, ``buffer:NAME``, ``exp_avg:NAME``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRAIN_FILE = "portable_train.onnx"
EVAL_FILE = "portable_eval.onnx"
STATE_FILE = "portable_state.npz"
PORTABLE_FILES = (TRAIN_FILE, EVAL_FILE, STATE_FILE)
OPSET = 18
"""The ai.onnx opset of the portable graphs (IR version 10): run here by onnxruntime 1.19.2 and 1.32.0."""
NEXT = "next:"
"""Prefix of the train graph's output that carries a state tensor's next value."""


def param_key(name: str) -> str:
    return f"param:{name}"


def buffer_key(name: str) -> str:
    return f"buffer:{name}"


def exp_avg_key(name: str) -> str:
    return f"exp_avg:{name}"


def exp_avg_sq_key(name: str) -> str:
    return f"exp_avg_sq:{name}"


@dataclass(kw_only=True, slots=True)
class PortableSchema:
    """What the manifest says of a block's portable graphs."""

    parameters: list[str]
    """Trained tensors, in the graphs' input order."""
    buffers: list[str]
    """Tensors the forward reads but the optimizer does not train (BatchNorm statistics, frozen weights)."""
    optimizer_state: list[str] = field(default_factory=list)
    """Per-parameter optimizer tensors: ["exp_avg", "exp_avg_sq"] for AdamW, [] for SGD."""
    opset: int = OPSET
    num_state_bytes: int = 0
    estimated_peak_bytes: int = 0
    """Rough peak training memory of the portable step at the manifest's batch size (as
    ``BlockManifest.estimated_peak_bytes`` for onnxruntime-training's); 0: not estimated (older exports)."""
    in_place: bool = False
    """The train graph runs every update after all else (``export.in_place``), so the runner writes the
    next state over the current one: one copy of the state. False (older exports): two copies in turn."""

    def state_keys(self) -> list[str]:
        """Every state tensor, in the train graph's input order."""
        keys = [param_key(n) for n in self.parameters] + [buffer_key(n) for n in self.buffers]
        for kind in self.optimizer_state:
            keys += [f"{kind}:{n}" for n in self.parameters]
        return keys

    def model_keys(self) -> list[str]:
        """The state the eval graph reads: parameters and buffers."""
        return [param_key(n) for n in self.parameters] + [buffer_key(n) for n in self.buffers]
