"""``export_model``: partition a model, attach local-loss heads, and write one artifact folder per block."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgebll.errors import ExportError
from edgebll.manifest import (
    ARTIFACT_FILES, MANIFEST_NAME, METHODS, RUN_NAME, BlockManifest, block_dir_name, sha256_file, write_json_atomic,
)

from .artifacts import OptimizerConfig, export_training_onnx, generate_block_artifacts
from .heads import make_head
from .local_block import LocalBlock
from .models import ModelSpec, build_model
from .partition import balanced_split, unit_costs


@dataclass
class ExportedBlock:
    """A block as built in torch (kept for parity tests and the torch reference path)."""

    module: LocalBlock
    input_shape: tuple[int, ...]
    manifest: BlockManifest


def build_blocks(spec: ModelSpec, method: str, num_blocks: int, head: str = "conv") -> tuple[list[LocalBlock], list[tuple[int, ...]], list[list[int]]]:
    """Partition ``spec`` into torch ``LocalBlock``s; returns blocks, their input shapes and unit indices."""
    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "bp" and num_blocks != 1:
        raise ExportError(f"--method bp trains the whole model end to end as one block; got --blocks {num_blocks}, use --blocks 1")
    costs, shapes = unit_costs(spec.units, spec.input_shape)
    bounds = balanced_split(costs, num_blocks)
    blocks, in_shapes, groups = [], [], []
    for k in range(num_blocks):
        lo, hi = bounds[k], bounds[k + 1]
        in_shape = spec.input_shape if lo == 0 else shapes[lo - 1]
        last = k == num_blocks - 1
        # The last block's head is the classifier, always pool + linear; earlier blocks may use a conv head.
        head_module = make_head("linear" if last else head, shapes[hi - 1], spec.num_classes)
        blocks.append(LocalBlock(spec.units[lo:hi], head_module, emits_message=not last))
        in_shapes.append(tuple(in_shape))
        groups.append(list(range(lo, hi)))
    return blocks, in_shapes, groups


def _estimate_peak_bytes(block: LocalBlock, input_shape: tuple[int, ...], batch_size: int, optimizer: str) -> int:
    """Weights + gradients + optimizer state + every layer output kept for backward (float32)."""
    params = sum(p.numel() for p in block.parameters())
    state = params * (4 if optimizer == "adamw" else 2)  # weight, grad (+ 2 moments)
    activations = [0]

    def hook(_m: nn.Module, _i: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            activations[0] += out.numel()

    leaves = [m for m in block.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    block.eval()
    with torch.no_grad():
        block(torch.zeros(1, *input_shape), torch.zeros(1, dtype=torch.int64))
    block.train()
    for h in handles:
        h.remove()
    message = 2 * int(torch.tensor(input_shape).prod())  # decoded input + its gradient-free copy
    return 4 * (state + batch_size * (activations[0] + message))


def export_model(
    model: str | Sequence[nn.Module] | nn.Sequential = "cnn-small",
    *,
    out: str | os.PathLike,
    method: str = "bwbpf",
    blocks: int = 4,
    batch_size: int = 64,
    head: str = "conv",
    optimizer: str | OptimizerConfig = "adamw",
    lr: float = 1e-3,
    seed: int = 0,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export ``model`` as ``blocks`` ORT training artifacts under ``out`` and return the run folder.

    ``model`` is a zoo name (``"cnn-small"``, ``"resnet18"``) or your own list of modules (each one a
    unit the partitioner will not split). ``head`` is the local head of every block but the last
    ("conv": stride-2 conv + pool + linear, "linear": pool + linear). ``lr`` is stored in
    ``run.json`` as the default for ``edgebll train``.
    """
    if batch_size < 2:
        raise ExportError(f"--batch-size must be at least 2 (BatchNorm needs a batch), got {batch_size}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty; hint: choose another --out or pass --overwrite")
        shutil.rmtree(out)
    config = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(name=optimizer)
    torch.manual_seed(seed)
    spec = build_model(model, input_shape=input_shape, num_classes=num_classes)
    torch_blocks, in_shapes, groups = build_blocks(spec, method, blocks, head)
    out.mkdir(parents=True, exist_ok=True)
    for k in tqdm(range(blocks), desc="export", unit="block", disable=not progress):
        export_block(torch_blocks[k], in_shapes[k], out / block_dir_name(k), index=k, num_blocks=blocks, method=method,
                     model_name=spec.name, unit_names=[spec.unit_names[u] for u in groups[k]], batch_size=batch_size,
                     optimizer=config)
    run = {
        "format_version": 1, "model": spec.name, "method": method, "blocks": blocks, "batch_size": batch_size,
        "head": head, "optimizer": config.to_dict(), "lr": lr, "seed": seed, "input_shape": list(input_shape),
        "num_classes": num_classes, "data": {"dataset": "fashion-mnist"},
        "units": [[spec.unit_names[u] for u in g] for g in groups],
    }
    write_json_atomic(out / RUN_NAME, json.dumps(run, indent=1))
    return out


def export_block(block: LocalBlock, input_shape: tuple[int, ...], block_dir: Path, *, index: int, num_blocks: int,
                 method: str, model_name: str, unit_names: list[str], batch_size: int,
                 optimizer: OptimizerConfig) -> BlockManifest:
    """Write one block's artifacts and manifest into ``block_dir``."""
    block_dir.mkdir(parents=True, exist_ok=True)
    onnx_model, graph = export_training_onnx(block, input_shape, batch_size)
    trainable = [name for name, p in block.named_parameters() if p.requires_grad]
    generate_block_artifacts(onnx_model, graph, trainable, block_dir, optimizer)
    manifest = BlockManifest(
        index=index, num_blocks=num_blocks, method=method, model=model_name, units=unit_names,
        inputs=graph.inputs, outputs=graph.outputs, bn_stats=graph.bn_stats, optimizer=optimizer.to_dict(),
        batch_size=batch_size, num_parameters=sum(p.numel() for p in block.parameters()),
        estimated_peak_bytes=_estimate_peak_bytes(block, input_shape, batch_size, optimizer.name),
        files={name: sha256_file(block_dir / name) for name in ARTIFACT_FILES},
    )
    write_json_atomic(block_dir / MANIFEST_NAME, manifest.to_json())
    return manifest
