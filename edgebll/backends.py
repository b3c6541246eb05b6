"""Which runtime trains a block: onnxruntime-training's API, or the portable graphs on plain onnxruntime."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Union

from edgebll.errors import EdgeBLLError
from edgebll.manifest import load_block_manifest
from edgebll.ort_training import training_available
from edgebll.portable import PROVIDERS, PortableRunner
from edgebll.runner import BlockRunner

BACKENDS = ("auto", "ort-training", "portable")
Runner = Union[BlockRunner, PortableRunner]


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


def open_block(block_dir: str | os.PathLike, *, backend: str = "auto", provider: str = "cpu", threads: int = 0,
               verify_files: bool = True, load_trained: bool = True) -> Runner:
    """A runner for the block in ``block_dir`` on ``backend`` ("auto", "ort-training" or "portable")."""
    manifest = load_block_manifest(block_dir, verify_files=False)  # the runner verifies the files it loads
    chosen = resolve_backend(backend, manifest.backends(), provider=provider, where=f"{Path(block_dir)}")
    if chosen == "portable":
        return PortableRunner(block_dir, threads=threads, verify_files=verify_files, load_trained=load_trained,
                              provider=provider)
    return BlockRunner(block_dir, threads=threads, verify_files=verify_files, load_trained=load_trained)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--backend and --provider: which runtime trains the blocks, on which execution provider."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="ort-training: onnxruntime-training's API (x86-64 hosts); portable: each block's whole step "
                        "as one standard-op graph on plain onnxruntime (boards: aarch64, Jetson); auto: the training "
                        "build where it is installed, else portable (default: auto)")
    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu",
                   help="ONNX Runtime execution provider of the portable backend: cpu, or cuda (onnxruntime-gpu, "
                        "e.g. a Jetson's) (default: cpu)")
