"""Check, right after export, that every block's estimated peak memory fits the board it is meant for."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgebll.devices.profiles import DeviceProfile, format_bytes
from edgebll.errors import ExportError
from edgebll.json_files import write_json_atomic
from edgebll.manifest import MANIFEST_NAME, BlockManifest, load_block_manifest
from edgebll.memory import estimate_peak_bytes
from edgebll.run_folder import FEEDBACK_DIR, RUN_NAME, block_dir_name, load_run_config

from .split_search import Split, search_split

def block_allowance_bytes(device: DeviceProfile) -> int:
    """What one block may use on ``device``: its training budget less the idle runtime."""
    return device.budget_bytes - device.idle_bytes


@dataclass(frozen=True)
class BlockFit:
    """One block's estimate against its board's budget."""

    index: int
    device: DeviceProfile
    estimated_bytes: int
    """The forward block's estimate plus, for BLL, its feedback block's (both train on the board)."""
    units: tuple[str, ...] = ()
    """The model's units the block holds."""

    @property
    def allowance_bytes(self) -> int:
        return block_allowance_bytes(self.device)

    @property
    def fits(self) -> bool:
        return self.estimated_bytes <= self.allowance_bytes


def assign_devices(devices: DeviceProfile | Sequence[DeviceProfile], num_blocks: int) -> list[DeviceProfile]:
    """One board for every block, or one board per block (a heterogeneous list of exactly K boards)."""
    if isinstance(devices, DeviceProfile):
        return [devices] * num_blocks
    devices = list(devices)
    if len(devices) == 1:
        return devices * num_blocks
    if len(devices) != num_blocks:
        raise ExportError(f"--device lists {len(devices)} boards for {num_blocks} blocks; give one board, or one "
                          "per block")
    return devices


def require_portable_graphs(devices: Sequence[DeviceProfile], portable: bool) -> None:
    """Refuse, before anything is exported, boards that train on portable graphs when the export leaves them out."""
    boards = [f"{board.name} ({board.arch})" for board in devices if board.backend == "portable"]
    if boards and not portable:
        raise ExportError(f"{', '.join(boards)} train with the portable backend (onnxruntime-training has no wheel "
                          "for their CPU), which --no-portable leaves out; hint: drop --no-portable")


def block_estimate(manifest: BlockManifest, device: DeviceProfile, where: Path) -> int:
    """The block's estimated peak on the backend ``device`` trains with (``DeviceProfile.backend``)."""
    backend = device.backend
    if backend not in manifest.backends():
        raise ExportError(f"{where}: {device.name} ({device.arch}) trains with the {backend} backend, and this block "
                          f"has no {backend} graphs; hint: export with --portable (the default)")
    estimate = manifest.estimated_bytes(backend)
    if estimate <= 0:  # exported before the manifest carried the portable estimate
        estimate = int(estimate_peak_bytes(where, manifest=manifest, backend=backend).total)
    return estimate


def check_fit(run_dir: str | os.PathLike, devices: DeviceProfile | Sequence[DeviceProfile]) -> list[BlockFit]:
    """Each block's estimate (from its manifest) against its board; records the board in the manifests."""
    run_dir = Path(run_dir)
    fits = []
    for k, device in enumerate(assign_devices(devices, load_run_config(run_dir).blocks)):
        folders = [run_dir / block_dir_name(k)]
        if (folders[0] / FEEDBACK_DIR).is_dir():
            folders.append(folders[0] / FEEDBACK_DIR)
        estimate, units = 0, ()
        for folder in folders:
            manifest = load_block_manifest(folder, verify_files=False)
            estimate += block_estimate(manifest, device, folder)
            manifest.device = device.to_dict()
            write_json_atomic(folder / MANIFEST_NAME, manifest.to_json())
            units = units or tuple(manifest.units)  # the forward block's; a feedback block names itself
        fits.append(BlockFit(k, device, estimate, units))
    return fits


def fit_table(fits: list[BlockFit], positions: Sequence[int] | None = None) -> str:
    """A table for people: block, its units, board, estimate, allowance (budget minus the idle runtime), fits.

    ``positions``: per block, where its board is in the --device list (shown 1-based).
    """
    lines = [f"{'block':>5}  {'units':<22} {'device':<22} {'estimate':>11} {'allowance':>11}  fits"]
    for k, f in enumerate(fits):
        units = f.units[0] if len(f.units) == 1 else f"{f.units[0]}..{f.units[-1]}" if f.units else ""
        board = f.device.name + (f" (#{positions[k] + 1})" if positions is not None else "")
        lines.append(f"{f.index:>5}  {units:<22} {board:<22} {format_bytes(f.estimated_bytes):>11} "
                     f"{format_bytes(f.allowance_bytes):>11}  {'yes' if f.fits else 'NO'}")
    return "\n".join(lines)


def refuse_misfits(fits: list[BlockFit], batch_size: int) -> None:
    """Raise ExportError naming every block that does not fit, by how much, and what to do."""
    bad = [f for f in fits if not f.fits]
    if bad:
        what = "; ".join(f"block {f.index} needs about {format_bytes(f.estimated_bytes)} but {f.device.name} allows "
                         f"{format_bytes(f.allowance_bytes)} (short by {format_bytes(f.estimated_bytes - f.allowance_bytes)})"
                         for f in bad)
        raise ExportError(f"{what}; hint: more --blocks, a smaller --batch-size than {batch_size}, or a bigger board")


@dataclass(frozen=True)
class AutoPartition:
    """What ``--blocks auto`` chose and exported (:func:`export_to_fit`)."""

    run_dir: Path
    fits: list[BlockFit]
    """Each block's estimate, read back from the exported manifests, against its board."""
    split: Split
    """The boundaries and, per block, the index of its board in the boards given."""
    boards: list[DeviceProfile]
    """The boards as given."""
    searched_bytes: list[int]
    """Each block's estimate as the search saw it; the same bytes as ``fits``' (a test checks it)."""
    ranges_estimated: int
    """Unit ranges the search exported to estimate, and the time it took."""
    search_seconds: float
    estimate_scale: float = 1.0
    """What the search multiplied the training graphs' estimates by: 1 unless a board trains on the portable
    graphs (then the largest portable/training ratio of an exported block, see :func:`export_to_fit`)."""
    attempts: int = 1
    """Splits exported until every block fitted by its own estimate."""

    def unused_boards(self) -> list[int]:
        """Positions (0-based) of listed boards that take no block."""
        return [] if len(self.boards) == 1 else [i for i in range(len(self.boards)) if i not in self.split.boards]

    def to_dict(self) -> dict[str, Any]:
        """What run.json records under "partition"."""
        return {"search": "fewest blocks that fit, then the smallest largest block (MACs incl. head)",
                "bounds": list(self.split.bounds), "max_block_macs": self.split.max_cost,
                "boards": [self.boards[i].name for i in self.split.boards],
                "board_positions": list(self.split.boards) if len(self.boards) > 1 else None,
                "estimated_peak_bytes": [f.estimated_bytes for f in self.fits],
                "search_matches_manifests": self.searched_bytes == [f.estimated_bytes for f in self.fits],
                "allowance_bytes": [f.allowance_bytes for f in self.fits],
                "ranges_estimated": self.ranges_estimated, "search_seconds": round(self.search_seconds, 1),
                "estimate_scale": round(self.estimate_scale, 4), "attempts": self.attempts}


def export_to_fit(model: Any, *, out: str | os.PathLike, devices: DeviceProfile | Sequence[DeviceProfile],
                  method: str = "bwbpf", progress: bool = True, **export_options: Any) -> AutoPartition:
    """Export ``model`` in the fewest blocks (at unit granularity) that each fit their board, slowest block fastest.

    ``devices``: one board (as many of it as the split needs) or a list of boards, each taking at
    most one block; the search chooses which board takes which block (:mod:`.split_search`), with
    every range's memory estimated from its exported training graph (:mod:`.range_memory`). The
    chosen split is then exported and every block checked again from its manifest. When nothing
    fits, the error names each unit too big alone for the largest board and by how much, or says how
    many boards it would take.

    A board that trains on the portable graphs (every aarch64 board) is checked against the portable
    step's estimate, but exporting a range's portable graph takes ~60× longer than its training
    graph (torch's tracer and exporter; resnet18's search went from 79 s to more than 15 minutes).
    So the search runs on the training graphs' estimates times a scale (first 1), the split is
    exported with its portable graphs and checked exactly, and while a block does not fit, the
    scale grows to the largest portable/training ratio of the exported blocks and the search runs
    again (at most :data:`MAX_ATTEMPTS` exports), with the exact estimate for every range already
    exported as a block. Every block then fits by its own estimate; the fewest-blocks optimum is
    that of the scaled estimates, not of the portable graphs' own.
    """
    from .artifacts import OptimizerConfig
    from .exporter import export_model, local_loss_modules
    from .models import build_model
    from .partition import range_costs, unit_costs
    from .range_memory import RangeMemory

    out = Path(out)
    overwrite = export_options.pop("overwrite", False)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; hint: choose another --out or pass --overwrite")
    if method == "bp":
        raise ExportError("--blocks auto splits a model into blocks; --method bp is one block by definition")
    spec = build_model(model, input_shape=export_options.get("input_shape", (1, 28, 28)),
                       num_classes=export_options.get("num_classes", 10), data=export_options.get("data"))
    boards = [devices] if isinstance(devices, DeviceProfile) else list(devices)
    require_portable_graphs(boards, export_options.get("portable", True))
    allowances = [block_allowance_bytes(board) for board in boards]
    head, n = export_options.get("head", "conv"), len(spec.units)
    optimizer, predsim = export_options.get("optimizer", "adamw"), export_options.get("predsim")
    min_blocks = min_blocks_of(method)
    unit_macs, shapes = unit_costs(spec.units, spec.input_shape, spec.input_dtype)
    costs = range_costs(spec.units, spec.input_shape, lambda lo, hi: local_loss_modules(
        spec, method, head, lo, hi, unit_macs, shapes, predsim), spec.input_dtype)
    batch_size = export_options.get("batch_size", 64)
    memory = RangeMemory(spec=spec, method=method, batch_size=batch_size, head=head,
                         latent=export_options.get("latent", "categorical"), predsim=predsim,
                         optimizer=optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(name=optimizer))
    if progress:
        print(f"searching block boundaries of {n} units for {', '.join(b.name for b in boards)} ...", file=sys.stderr)
    scale = 1.0
    checked: dict[tuple[int, int], int] = {}  # a range exported as a block: its estimate on its board's backend
    trial = out.with_name(f".{out.name}.fitting")
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            def scaled(lo: int, hi: int, scale: float = scale) -> int:
                return checked[lo, hi] if (lo, hi) in checked else math.ceil(memory(lo, hi) * scale)

            # how many ranges the search will ask for is not known ahead: the bar counts them (each is an export)
            with tqdm(desc="ranges estimated", unit="range", initial=len(memory.estimates), disable=not progress,
                      file=sys.stderr) as bar:
                memory.on_estimate = lambda lo, hi: bar.update()
                split = search_split(n, lambda lo, hi: costs[lo][hi], scaled, allowances, reuse=len(boards) == 1,
                                     min_blocks=min_blocks)
            memory.on_estimate = None
            if split is None:
                raise ExportError(_no_split_message(spec.unit_names, scaled, boards, allowances, method))
            export_model(model, out=trial, method=method, blocks=split.num_blocks, bounds=split.bounds,
                         overwrite=True, progress=progress, **export_options)
            fits = check_fit(trial, [boards[i] for i in split.boards])
            checked |= {span: f.estimated_bytes for span, f in zip(split.ranges(), fits)}
            if all(f.fits for f in fits) or attempt == MAX_ATTEMPTS:
                break
            ratio = max(f.estimated_bytes / memory(lo, hi) for f, (lo, hi) in zip(fits, split.ranges()))
            # a misfit range is never chosen again: it now counts with its exact estimate, over the allowance
            scale = max(scale, ratio)
            if progress:
                print(f"a block does not fit by its portable graph's estimate; searching again with the training "
                      f"estimates x {scale:.3f}", file=sys.stderr)
        refuse_misfits(fits, batch_size)  # the exported graphs have the last word
        result = AutoPartition(run_dir=out, fits=fits, split=split, boards=boards,
                               searched_bytes=[scaled(lo, hi) for lo, hi in split.ranges()],
                               ranges_estimated=len(memory.estimates), search_seconds=memory.seconds,
                               estimate_scale=scale, attempts=attempt)
        config = load_run_config(trial)
        write_json_atomic(trial / RUN_NAME, json.dumps({**config.to_dict(), "partition": result.to_dict()}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        trial.rename(out)
    finally:
        shutil.rmtree(trial, ignore_errors=True)
    return result


MAX_ATTEMPTS = 4
"""Splits ``export_to_fit`` exports at most before it gives up on a board's portable estimate."""


def min_blocks_of(method: str) -> int:
    """The fewest blocks ``method`` trains: BLL and Pred-Sim need a block below the classifier."""
    return 2 if method in ("bll", "predsim") else 1


def _no_split_message(names: list[str], memory: Any, boards: list[DeviceProfile], allowances: list[int],
                      method: str) -> str:
    """Why no split fits: the units too big alone for the largest board, or too few boards for the rest."""
    min_blocks = min_blocks_of(method)
    largest = max(range(len(boards)), key=lambda i: allowances[i])
    big, room = boards[largest], allowances[largest]
    n = len(names)
    alone = [(u, memory(u, u + 1)) for u in range(n)] if min_blocks == 1 or n > 1 else []
    too_big = [(u, need) for u, need in alone if need > room]
    if too_big:
        detail = "; ".join(f"unit {names[u]!r} alone needs about {format_bytes(need)}, {big.name} allows "
                           f"{format_bytes(room)} (short by {format_bytes(need - room)})" for u, need in too_big)
        return (f"no split into 1..{n} blocks fits: {detail}; hint: a smaller --batch-size, or a bigger board for "
                "that unit")
    needed = search_split(n, lambda lo, hi: 0.0, memory, [room], reuse=True, min_blocks=min_blocks)
    fewest = f"on boards like {big.name} it takes {needed.num_blocks} blocks" if needed else "no split fits"
    return (f"no assignment of the {len(boards)} boards listed fits the model: {fewest}; hint: list more boards, "
            "bigger ones, or a smaller --batch-size")
