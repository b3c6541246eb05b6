"""Check, right after export, that every block's estimated peak memory fits the board it is meant for."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebll.devices.profiles import DeviceProfile, format_bytes
from edgebll.errors import ExportError
from edgebll.manifest import (
    FEEDBACK_DIR, MANIFEST_NAME, block_dir_name, load_block_manifest, load_run_config, write_json_atomic,
)

IDLE_RUNTIME_BYTES = 50 * 2**20
"""Resident memory of an idle interpreter with numpy and ORT's training API imported, which the
estimate does not include (measured: 50.2 MiB on x86-64, benchmarks/results/memory.md)."""


@dataclass(frozen=True)
class BlockFit:
    """One block's estimate against its board's budget."""

    index: int
    device: DeviceProfile
    estimated_bytes: int
    """The forward block's estimate plus, for BLL, its feedback block's (both train on the board)."""

    @property
    def allowance_bytes(self) -> int:
        return self.device.budget_bytes - IDLE_RUNTIME_BYTES

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


def check_fit(run_dir: str | os.PathLike, devices: DeviceProfile | Sequence[DeviceProfile]) -> list[BlockFit]:
    """Each block's estimate (from its manifest) against its board; records the board in the manifests."""
    run_dir = Path(run_dir)
    fits = []
    for k, device in enumerate(assign_devices(devices, int(load_run_config(run_dir)["blocks"]))):
        folders = [run_dir / block_dir_name(k)]
        if (folders[0] / FEEDBACK_DIR).is_dir():
            folders.append(folders[0] / FEEDBACK_DIR)
        estimate = 0
        for folder in folders:
            manifest = load_block_manifest(folder, verify_files=False)
            manifest.device = device.to_dict()
            write_json_atomic(folder / MANIFEST_NAME, manifest.to_json())
            estimate += manifest.estimated_peak_bytes
        fits.append(BlockFit(k, device, estimate))
    return fits


def fit_table(fits: list[BlockFit]) -> str:
    """A table for people: block, board, estimate, allowance (budget minus the idle runtime), fits."""
    lines = [f"{'block':>5}  {'device':<22} {'estimate':>11} {'allowance':>11}  fits"]
    for f in fits:
        lines.append(f"{f.index:>5}  {f.device.name:<22} {format_bytes(f.estimated_bytes):>11} "
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


def export_to_fit(model: Any, *, out: str | os.PathLike, devices: DeviceProfile | Sequence[DeviceProfile],
                  method: str = "bwbpf", progress: bool = True, **export_options: Any) -> tuple[Path, list[BlockFit]]:
    """Export ``model`` in the fewest blocks (at unit granularity) whose every block fits its board.

    The partition keeps balancing cost (MACs) so the slowest block is as fast as the split allows;
    with one board per block (a list of K boards) K is fixed. When even one unit per block does not
    fit, the error names each unit that is too big alone and by how much.
    """
    from tqdm import tqdm

    from .exporter import export_model
    from .models import build_model

    out = Path(out)
    overwrite = export_options.pop("overwrite", False)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; hint: choose another --out or pass --overwrite")
    spec = build_model(model, input_shape=export_options.get("input_shape", (1, 28, 28)),
                       num_classes=export_options.get("num_classes", 10))
    if method == "bp":
        raise ExportError("--blocks auto splits a model into blocks; --method bp is one block by definition")
    boards = [devices] if isinstance(devices, DeviceProfile) else list(devices)
    first = 2 if method in ("bll", "predsim") else 1  # both need a block below the classifier
    candidates = [len(boards)] if len(boards) > 1 else list(range(first, len(spec.units) + 1))
    trial = out.with_name(f".{out.name}.fitting")
    fits: list[BlockFit] = []
    for k in tqdm(candidates, desc="fit", unit="split", disable=not progress):
        export_model(model, out=trial, method=method, blocks=k, overwrite=True, progress=False, **export_options)
        fits = check_fit(trial, boards)
        if all(f.fits for f in fits):
            if out.exists():
                shutil.rmtree(out)
            trial.rename(out)
            return out, fits
    shutil.rmtree(trial, ignore_errors=True)
    bad = [f for f in fits if not f.fits]
    if len(candidates) == 1 and len(boards) > 1:
        refuse_misfits(fits, export_options.get("batch_size", 64))
    names = [spec.unit_names[f.index] for f in bad] if len(fits) == len(spec.units) else []
    detail = "; ".join(f"unit {name!r} alone needs about {format_bytes(f.estimated_bytes)}, "
                       f"{f.device.name} allows {format_bytes(f.allowance_bytes)} "
                       f"(short by {format_bytes(f.estimated_bytes - f.allowance_bytes)})" for name, f in zip(names, bad))
    raise ExportError(f"no split into 1..{len(spec.units)} blocks fits: {detail}; hint: a smaller --batch-size, "
                      "or a bigger board for that unit")
