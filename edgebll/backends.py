"""Which runtime trains a block: onnxruntime-training's API, or the portable graphs on plain onnxruntime."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

from edgebll.errors import EdgeBLLError
from edgebll.manifest import load_block_manifest
from edgebll.ort_training import training_available
from edgebll.portable import PROVIDERS, PortableRunner
from edgebll.checkpoints import TRAINED_DIR, TRAINED_STATE
from edgebll.runner import BlockRunner

if TYPE_CHECKING:
    from edgebll.frozen import FrozenRunner


BACKENDS = ("auto", "ort-training", "portable")
Runner = Union[BlockRunner, PortableRunner, "FrozenRunner"]


def resolve_backend(backend: str, offered: list[str], *, provider: str = "cpu", where: str = "the block") -> str:
    """The backend that trains a block whose manifest offers ``offered`` ("auto": the training build where it
    is importable and the block has its artifacts, else the portable graphs)."""
    if backend not in BACKENDS:
        raise EdgeBLLError(f"unknown --backend {backend!r}; choose one of {list(BACKENDS)}")
    if provider not in PROVIDERS:
        raise EdgeBLLError(f"unknown --provider {provider!r}; choose one of {list(PROVIDERS)}")
    if backend == "auto":
        if "ort-training" in offered and training_available() and provider == "cpu":
            return "ort-training"
        if "portable" in offered:
            return "portable"
        backend = "ort-training"  # the only thing this block has: say what is missing for it
    if backend not in offered:
        hint = ("re-export the run (portable graphs are written by default)" if backend == "portable"
                else "re-export the run on a host with onnxruntime-training, or use --backend portable")
        raise EdgeBLLError(f"{where} has no {backend} files (it offers {offered}); hint: {hint}")
    if backend == "ort-training" and provider != "cpu":
        raise EdgeBLLError(f"--provider {provider}: the onnxruntime-training backend runs on the CPU only; "
                           "hint: --backend portable with an onnxruntime build that has the provider")
    return backend


def trained_backend(block_dir: str | os.PathLike) -> str | None:
    """The backend whose trained state ``block_dir/trained/`` holds (None: not trained yet)."""
    found = [name for name, file in TRAINED_STATE.items() if (Path(block_dir) / TRAINED_DIR / file).is_file()]
    if len(found) > 1:  # only a save interrupted between its rename and the clean-up leaves both
        found.sort(key=lambda name: (Path(block_dir) / TRAINED_DIR / TRAINED_STATE[name]).stat().st_mtime)
    return found[-1] if found else None


def open_block(block_dir: str | os.PathLike, *, backend: str = "auto", provider: str = "cpu", threads: int = 0,
               verify_files: bool = True, load_trained: bool = True, frozen: bool = False) -> Runner:
    """A runner for the block in ``block_dir`` on ``backend`` ("auto", "ort-training" or "portable").

    With ``load_trained``, a trained block continues on the backend that trained it: "auto" picks
    that one, and another backend is refused (its state would silently start from the exported
    weights). ``load_trained=False`` (``--restart``) may switch. ``frozen``: the block does not
    train (``--freeze-blocks``): its eval graph and weights only (:class:`~edgebll.frozen.FrozenRunner`).
    """
    manifest = load_block_manifest(block_dir, verify_files=False)  # the runner verifies the files it loads
    where = f"{Path(block_dir)}"
    trained = trained_backend(block_dir) if load_trained else None
    if trained is not None and backend in ("auto", trained):
        backend = trained
    elif trained is not None:
        raise EdgeBLLError(f"{where} was trained on the {trained} backend ({TRAINED_DIR}/{TRAINED_STATE[trained]}); "
                           f"--backend {backend} cannot continue from that state; hint: --backend {trained} (or "
                           "auto), or --restart to train again from the exported weights")
    if trained == "ort-training" and not training_available():
        raise EdgeBLLError(f"{where} was trained with onnxruntime-training ({TRAINED_DIR}/checkpoint), which this "
                           "machine does not have; hint: continue on a machine that has it, or --restart to train "
                           "again here on the portable backend from the exported weights")
    chosen = resolve_backend(backend, manifest.backends(), provider=provider, where=where)
    if frozen:
        from edgebll.frozen import FrozenRunner

        return FrozenRunner(block_dir, backend=chosen, threads=threads, verify_files=verify_files,
                            load_trained=load_trained, provider=provider)
    if chosen == "portable":
        return PortableRunner(block_dir, threads=threads, verify_files=verify_files, load_trained=load_trained,
                              provider=provider)
    return BlockRunner(block_dir, threads=threads, verify_files=verify_files, load_trained=load_trained)


def block_list(text: str) -> tuple[int, ...]:
    """``--freeze-blocks 0,1`` -> (0, 1)."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 0,1, got {text!r}") from None


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--backend and --provider: which runtime trains the blocks, on which execution provider."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="ort-training: onnxruntime-training's API (x86-64 hosts); portable: each block's whole step "
                        "as one standard-op graph on plain onnxruntime (boards: aarch64, Jetson); auto: the training "
                        "build where it is installed, else portable (default: auto)")
    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu",
                   help="ONNX Runtime execution provider of the portable backend: cpu, or cuda (onnxruntime-gpu, "
                        "e.g. a Jetson's) (default: cpu)")
