"""``export_model``: partition a model, attach local-loss graphs, and write one artifact folder per block.

Per method, each block k becomes (see ``plan_blocks``):
- bwbpf / bp: ``LocalBlock(x, labels) -> (loss, logits[, y])`` (bp: one block, the whole model);
- bll: ``BLLForwardBlock(x, prior) -> (loss, logits, y, kl)`` for k < K-1 and a ``LocalBlock`` for the
  last (its posterior given the one-hot target is the target itself: cross-entropy), plus a
  ``FeedbackBlock(beta, target) -> (loss, logits, beta)`` in ``block-k/feedback`` for k < K-1;
- predsim: ``PredSimBlock(x, labels) -> (loss, logits, y, sim)`` for k < K-1 and a ``LocalBlock`` (the
  classifier, cross-entropy) for the last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgebll.errors import ExportError
from edgebll.memory import estimate_peak_bytes
from edgebll.json_files import write_json_atomic
from edgebll.manifest import ARTIFACT_FILES, MANIFEST_NAME, BlockManifest, sha256_file
from edgebll.ort_training import training_available
from edgebll.portable_schema import PORTABLE_FILES
from edgebll.run_folder import FEEDBACK_DIR, METHODS, RUN_NAME, block_dir_name

from .artifacts import GraphInput, OptimizerConfig, export_training_onnx, generate_block_artifacts
from .gaps import alternative, missing_gradient, unexportable
from .heads import make_head
from .init_from import initialise
from .local_block import LATENTS, BLLForwardBlock, FeedbackBlock, LocalBlock
from .models import ModelSpec, build_model
from .portable import export_portable
from .partition import balanced_split, check_bounds, unit_costs
from .predsim import PredSimBlock, PredSimConfig


@dataclass
class BlockPlan:
    """One trainable graph to export: the torch module (also the reference for parity tests) and its I/O."""

    module: nn.Module
    inputs: list[GraphInput]
    outputs: list[tuple[str, str]]
    """(name, role) in the module's return order, loss first."""
    index: int
    kind: str
    """"forward" or "feedback"."""
    units: list[str]


def block_head(kind: str, activation_shape: tuple[int, ...], num_classes: int, *, last: bool,
               per_token: bool = False, max_macs: float | None = None) -> nn.Module:
    """The local head of a block whose units end in ``activation_shape`` (``per_token``: a sequence model's).

    ``max_macs`` (the block's own multiply-accumulates per sample) caps the head's cost (heads.py).
    """
    # The last block's head is the classifier, always pool + linear; earlier blocks may use a conv head.
    return make_head("linear" if last else kind, activation_shape, num_classes, max_macs, per_token=per_token)


def local_loss_modules(spec: ModelSpec, method: str, head: str, lo: int, hi: int, costs: Sequence[float],
                       shapes: Sequence[tuple[int, ...]], predsim: PredSimConfig | None = None) -> list[nn.Module]:
    """What a block of units ``lo .. hi-1`` trains its local loss with besides its units (the boundary
    search counts their MACs): its head, or a Pred-Sim block's prediction and similarity heads."""
    last = hi == len(spec.units)
    if method == "predsim" and not last:
        block = PredSimBlock([], shapes[hi - 1], spec.num_classes, predsim)
        return [block.head, block.similarity]
    return [block_head(head, shapes[hi - 1], spec.num_classes, last=last, per_token=bool(spec.label_shape),
                       max_macs=sum(costs[lo:hi]))]


def build_blocks(spec: ModelSpec, method: str, num_blocks: int, head: str = "conv", latent: str = "categorical",
                 predsim: PredSimConfig | None = None, *,
                 bounds: Sequence[int] | None = None) -> tuple[list[nn.Module], list[tuple[int, ...]], list[list[int]]]:
    """Partition ``spec`` into forward blocks; returns the torch blocks, their input shapes and unit indices.

    ``bounds`` (``[0, b1, ..., n]``, as ``edgebll.export.fit`` chooses them) replaces the
    MAC-balanced split into ``num_blocks`` blocks.
    """
    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "bp" and num_blocks != 1:
        raise ExportError(f"--method bp trains the whole model end to end as one block; got --blocks {num_blocks}, use --blocks 1")
    if method == "bll" and num_blocks < 2:
        raise ExportError("--method bll needs at least 2 blocks (a single block is plain backprop: --method bp)")
    if method == "predsim" and num_blocks < 2:
        raise ExportError("--method predsim needs at least 2 blocks (its last block is the classifier, trained with "
                          "cross-entropy: one block is plain backprop, --method bp)")
    if method == "predsim" and spec.label_shape:
        raise ExportError(f"--method predsim compares the labels of whole samples; {spec.name} has one label per "
                          "token; hint: --method bll or bwbpf for the sequence task")
    if latent not in LATENTS:
        raise ExportError(f"unknown latent distribution {latent!r}; choose one of {list(LATENTS)}")
    costs, shapes = unit_costs(spec.units, spec.input_shape, spec.input_dtype)
    bounds = balanced_split(costs, num_blocks) if bounds is None else check_bounds(bounds, len(spec.units), num_blocks)
    blocks: list[nn.Module] = []
    in_shapes, groups = [], []
    for k in range(num_blocks):
        lo, hi = bounds[k], bounds[k + 1]
        last = k == num_blocks - 1
        head_module = block_head(head, shapes[hi - 1], spec.num_classes, last=last, per_token=bool(spec.label_shape),
                                 max_macs=sum(costs[lo:hi]))  # a head never outweighs its block (heads.py)
        if method == "bll" and not last:
            blocks.append(BLLForwardBlock(spec.units[lo:hi], head_module, latent))
        elif method == "predsim" and not last:
            blocks.append(PredSimBlock(spec.units[lo:hi], shapes[hi - 1], spec.num_classes, predsim))
        else:
            blocks.append(LocalBlock(spec.units[lo:hi], head_module, emits_message=not last))
        in_shapes.append(tuple(spec.input_shape if lo == 0 else shapes[lo - 1]))
        groups.append(list(range(lo, hi)))
    return blocks, in_shapes, groups


def plan_blocks(spec: ModelSpec, method: str, num_blocks: int, head: str = "conv", latent: str = "categorical",
                predsim: PredSimConfig | None = None, *, bounds: Sequence[int] | None = None) -> list[BlockPlan]:
    """Every graph to export for ``method``, forward blocks first, then BLL's feedback blocks."""
    blocks, in_shapes, groups = build_blocks(spec, method, num_blocks, head, latent, predsim, bounds=bounds)
    # one latent (logits, prior, beta, one-hot target) of num_classes units per label: per sample or per token
    latent_shape = (*spec.label_shape, spec.num_classes)
    plans = []
    for k, (block, shape, group) in enumerate(zip(blocks, in_shapes, groups)):
        names = [spec.unit_names[u] for u in group]
        # block 0 takes the data (token ids for a sequence model), the others a decoded float32 message
        message_in = GraphInput("x", shape, spec.input_dtype if k == 0 else "float32", "message")
        labels = GraphInput("labels", spec.label_shape, "int64", "labels")
        if isinstance(block, BLLForwardBlock):
            plans.append(BlockPlan(block, [message_in, GraphInput("prior", latent_shape, "float32", "prior")],
                                   [("loss", "loss"), ("logits", "logits"), ("y", "message"), ("kl", "metric")],
                                   k, "forward", names))
        elif isinstance(block, PredSimBlock):
            plans.append(BlockPlan(block, [message_in, labels],
                                   [("loss", "loss"), ("logits", "logits"), ("y", "message"), ("sim", "metric")],
                                   k, "forward", names))
        else:
            outputs = [("loss", "loss"), ("logits", "logits")] + ([("y", "message")] if k < num_blocks - 1 else [])
            plans.append(BlockPlan(block, [message_in, labels], outputs, k, "forward", names))
    if method == "bll":
        for k in range(num_blocks - 1):
            # beta_{k+1} is the one-hot target above the top feedback block, else sigmoid(b_{k+1}): both one unit per class
            plans.append(BlockPlan(FeedbackBlock(spec.num_classes, spec.num_classes, latent),
                                   [GraphInput("beta", latent_shape, "float32", "message"),
                                    GraphInput("target", latent_shape, "float32", "target")],
                                   [("loss", "loss"), ("logits", "logits"), ("beta_out", "message")], k, "feedback",
                                   [f"feedback{k}"]))
    return plans


def export_model(
    model: str | ModelSpec | Sequence[nn.Module] | nn.Sequential = "cnn-small",
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
    latent: str = "categorical",
    predsim: PredSimConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    bounds: Sequence[int] | None = None,
    portable: bool = True,
    data: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
) -> Path:
    """Export ``model`` as ``blocks`` ORT training artifacts under ``out`` and return the run folder.

    ``model`` is a zoo name (``"cnn-small"``, ``"resnet18"``, ``"vgg8b"``, ``"transformer"``: the
    sequence task, which brings its own input shape, classes and data) or your own list of modules
    (each one a unit the partitioner will not split). ``method``: "bwbpf", "bll", "bp" or "predsim".
    ``head`` is the local head of every block but the last ("conv": stride-2 conv + pool + linear,
    "linear": pool + linear, "mlp": conv + pool + hidden layer + linear). ``latent`` (bll): the
    distribution of each block's latent, "categorical" or "bernoulli". ``predsim`` (predsim): the
    mix of its prediction and similarity terms (default: 0.01 / 0.99). ``lr`` is stored in
    ``run.json`` as the default for ``edgebll train``. ``bounds`` (``[0, b1, ..., n]``,
    ``len(bounds) == blocks + 1``) sets the unit boundaries instead of the MAC-balanced split.
    ``portable`` also writes every block's portable training step (standard ONNX ops: plain
    onnxruntime trains it, on boards where onnxruntime-training does not install).
    ``data``: a dataset folder (``edgebll data import``): the sample shape and classes come from it
    (instead of ``input_shape`` and ``num_classes``) and run.json records it for training.
    ``init_from``: pretrained weights, from a trained edgebll run of the same model, a torch
    state_dict of ``nn.Sequential(*units)`` or an ONNX model of it with BatchNorm unfolded
    (:mod:`.init_from`).
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
    spec = build_model(model, input_shape=input_shape, num_classes=num_classes, data=data)
    predsim = predsim or PredSimConfig()
    predsim.validate()
    plans = plan_blocks(spec, method, blocks, head, latent, predsim, bounds=bounds)
    initialised = initialise(init_from, spec, plans) if init_from is not None else None
    out.mkdir(parents=True, exist_ok=True)
    try:  # a layer refused half-way leaves no half-written run behind
        manifests = []
        for plan in tqdm(plans, desc="export", unit="graph", disable=not progress):
            folder = out / block_dir_name(plan.index)
            manifests.append(export_block(plan, folder / FEEDBACK_DIR if plan.kind == "feedback" else folder,
                                          num_blocks=blocks, method=method, model_name=spec.name,
                                          batch_size=batch_size, optimizer=config, portable=portable))
        run = {
            "format_version": 1, "model": spec.name, "method": method, "blocks": blocks, "batch_size": batch_size,
            # a sequence model's heads are per-token read-outs whatever --head says
            "head": "token" if spec.label_shape else head, "latent": latent if method == "bll" else None,
            "optimizer": config.to_dict(), "lr": lr, "seed": seed, "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes, "data": spec.data,
            "units": [p.units for p in plans if p.kind == "forward"],
            "predsim": asdict(predsim) if method == "predsim" else None,
            "backends": sorted(set.intersection(*(set(m.backends()) for m in manifests))),
            "init_from": initialised,
        }
        write_json_atomic(out / RUN_NAME, json.dumps(run, indent=1))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _log(block_dir: Path, line: str) -> None:
    with open(block_dir / "export.log", "a", encoding="utf-8") as log:
        log.write(line + "\n")


def export_block(plan: BlockPlan, block_dir: Path, *, num_blocks: int, method: str, model_name: str,
                 batch_size: int, optimizer: OptimizerConfig, trace_batch_size: int | None = None,
                 portable: bool = False) -> BlockManifest:
    """Write one graph's artifacts and manifest into ``block_dir`` (``portable``: its portable graphs too).

    ``trace_batch_size``: the batch of the example inputs torch traces with (default ``batch_size``).
    The graph's batch axis is symbolic, so a small one exports the same graph faster; the manifest
    and its estimate still use ``batch_size``.
    """
    where = f"{'feedback ' if plan.kind == 'feedback' else ''}block {plan.index} (units {plan.units})"
    if not portable and not training_available():  # refused before the folder and the trace, which takes the time
        raise ExportError(f"{where}: --no-portable writes only the training build's artifacts, which need "
                          "onnxruntime-training, and it is not installed; hint: export with --portable (the "
                          "default), whose graphs train with --backend portable on any onnxruntime, or on x86-64 "
                          "`pip install onnxruntime-training-cpu==1.19.2`")
    block_dir.mkdir(parents=True, exist_ok=True)
    try:
        onnx_model, graph = export_training_onnx(plan.module, plan.inputs, plan.outputs, trace_batch_size or batch_size)
    except Exception as exc:  # torch.onnx's errors share no base class worth naming
        refused = unexportable(str(exc), plan.module)
        if refused is None:
            raise
        raise ExportError(f"{where}: {refused}") from exc
    trainable = [name for name, p in plan.module.named_parameters() if p.requires_grad]
    files: list[str] = []
    if not training_available():  # e.g. an aarch64 host, or onnxruntime-gpu in its place
        _log(block_dir, f"{where}: onnxruntime-training is not installed: portable graphs only")
    else:
        try:
            generate_block_artifacts(onnx_model, graph, trainable, block_dir, optimizer)
            files += ARTIFACT_FILES
        except RuntimeError as exc:
            gap = missing_gradient(str(exc), plan.module)
            if gap is None:
                raise
            op, layer = gap
            if not portable:
                raise ExportError(f"{where}: onnxruntime-training has no gradient for {op}, which {layer} becomes; "
                                  "hint: export with --portable (the default) to train the block on the portable "
                                  f"backend, or use {alternative(op)}") from exc
            for name in ARTIFACT_FILES:  # the portable graphs train it; the training build's half is left out
                (block_dir / name).unlink(missing_ok=True)
            _log(block_dir, f"{where}: onnxruntime-training has no gradient for {op} ({layer}): portable graphs only")
    schema = None
    if portable:
        schema = export_portable(plan.module, plan.inputs, plan.outputs, block_dir, optimizer, where=where)
        files += PORTABLE_FILES
    manifest = BlockManifest(
        index=plan.index, num_blocks=num_blocks, method=method, kind=plan.kind, model=model_name, units=plan.units,
        inputs=graph.inputs, outputs=graph.outputs, bn_stats=graph.bn_stats, optimizer=optimizer.to_dict(),
        batch_size=batch_size, num_parameters=sum(p.numel() for p in plan.module.parameters()),
        estimated_peak_bytes=0, files={name: sha256_file(block_dir / name) for name in files},
        sizes={name: (block_dir / name).stat().st_size for name in files}, portable=schema,
    )
    # the device-side estimator, from the training graph itself (see edgebll/memory.py for its calibration)
    if schema is not None:
        schema.estimated_peak_bytes = int(estimate_peak_bytes(block_dir, batch_size, manifest=manifest,
                                                              backend="portable").total)
    manifest.estimated_peak_bytes = (int(estimate_peak_bytes(block_dir, batch_size, manifest=manifest).total)
                                     if ARTIFACT_FILES[0] in files else schema.estimated_peak_bytes)
    write_json_atomic(block_dir / MANIFEST_NAME, manifest.to_json())
    return manifest
