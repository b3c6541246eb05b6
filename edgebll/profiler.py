"""Measure the peak memory and step time of every block of a run, next to the estimate and a device budget.

``edgebll profile RUN --device rpi4-4gb`` trains each block for a few steps in a fresh child
process (:mod:`edgebll.profile_child`), exactly as a device would. The child reports its peak
resident memory (VmHWM) and the parent subtracts the peak of an idle child that imported the same
modules (numpy, edgebll's runtime, ONNX Runtime): the difference is what the block costs,
comparable with :func:`edgebll.memory.estimate_peak_bytes`. Writes ``RUN/profile.json`` and, with
matplotlib, ``RUN/profile.png`` (:mod:`edgebll.profile_report`).

``--enforce-budget`` also runs each child under a hard cap (RLIMIT_AS, see :func:`address_space_cap`),
so a block that cannot train within the device's budget fails here with "out of memory: ...". A
BLL run's feedback blocks (``block-k/feedback``) are measured like the forward blocks.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebll.backends import resolve_backend
from edgebll.errors import EdgeBLLError, MemoryCapError
from edgebll.json_files import write_json_atomic
from edgebll.manifest import load_block_manifest
from edgebll.memory import estimate_peak_bytes, runner_uses_memory_pattern
from edgebll.profile_child import oom_message
from edgebll.profile_report import plot_profile
from edgebll.run_folder import block_dirs, load_run_config

if TYPE_CHECKING:
    from edgebll.devices.profiles import DeviceProfile

PROFILE_NAME = "profile.json"
PLOT_NAME = "profile.png"

ADDRESS_SPACE_FACTOR = 2.0
"""Address space a block maps per byte it keeps resident. ORT's arena grows in regions of
doubling size and touches only part of the last one, so the smallest RLIMIT_AS under which a
block trains is up to 1.9 times its resident peak above the idle interpreter
(benchmarks/results/memory.json, "address_space"): a cap gives it twice its resident budget."""


@dataclass(kw_only=True, slots=True)
class Baseline:
    """An idle interpreter that imported numpy, edgebll's runtime and ONNX Runtime."""

    rss_bytes: int
    """Its peak resident memory (VmHWM)."""
    virtual_bytes: int
    """Its peak address space (VmPeak): an RLIMIT_AS cap must leave room for this first."""


@dataclass(kw_only=True, slots=True)
class BlockMeasurement:
    """One block trained for a few steps in its own process."""

    index: int
    kind: str
    measured_peak_bytes: int
    """Peak resident memory above the child's own after importing the runtime (what the baseline measures)."""
    peak_rss_bytes: int
    """The child's own VmHWM (baseline included)."""
    peak_virtual_bytes: int
    """The child's VmPeak."""
    step_ms: float
    """Median step time after the first (decode, train step, encode)."""
    first_step_ms: float
    steps: int
    mode: str = "train"
    """"train" (training steps) or "eval" (the eval graph: what `edgebll eval` runs)."""
    file_backed_bytes: int | None = None
    """Of the block's cost, the pages of mapped files it touched (RssFile at the end, above the import
    point): mostly ONNX Runtime's code. Clean pages, shared by every process on the board that maps the
    same library and dropped first under memory pressure; which of them a step touches depends on the
    CPU (its kernels are chosen per instruction set). None where the kernel does not report RssFile."""


def _run_child(arguments: list[str], *, cap: int | None, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgebll.profile_child", *arguments] + (["--cap", str(cap)] if cap else [])
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EdgeBLLError(f"profiling child timed out after {timeout:.0f} s: {' '.join(command)}") from exc


def _result(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise EdgeBLLError(f"profiling {what} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def measure_baseline(*, timeout: float = 300) -> Baseline:
    """Peak memory of an idle child with the runtime imported, measured as the blocks are."""
    status = _result(_run_child(["baseline"], cap=None, timeout=timeout), "the idle baseline")["status"]
    return Baseline(rss_bytes=status["VmHWM"], virtual_bytes=status["VmPeak"])


def measure_block(block_dir: str | os.PathLike, baseline: Baseline, *, steps: int = 5, threads: int = 0,
                  codec: str = "int8", batch_size: int | None = None, lr: float = 1e-3, budget: int | None = None,
                  cap: int | None = None, estimate: int | None = None, save: bool = False, index: int | None = None,
                  timeout: float = 600, mode: str = "train", backend: str = "auto") -> BlockMeasurement:
    """Train ``block_dir`` for ``steps`` steps in a child and measure it (``mode="eval"``: its eval
    graph instead, no update, as ``edgebll eval`` and ``--val-split`` run it).

    ``budget``: resident bytes the block may use above the baseline, enforced as the RLIMIT_AS of
    :func:`address_space_cap`; or ``cap``: an RLIMIT_AS in bytes. Either raises MemoryCapError when
    the block does not train within it. ``estimate`` only goes into that error's message.
    """
    if steps < 2:
        raise EdgeBLLError(f"--steps must be at least 2 (the first step warms up), got {steps}")
    if budget is not None and cap is not None:
        raise EdgeBLLError("give a resident budget or an address-space cap, not both")
    if mode not in ("train", "eval", "frozen"):
        raise EdgeBLLError(f"mode must be 'train', 'eval' or 'frozen', got {mode!r}")
    if save and mode == "eval":
        raise EdgeBLLError("an eval measurement trains nothing to save; drop save=True")
    if budget is not None:
        cap = address_space_cap(budget, baseline)
    arguments = ["block", str(block_dir), "--steps", str(steps), "--threads", str(threads), "--codec", codec,
                 "--lr", repr(lr), "--backend", backend]
    arguments += ["--batch-size", str(batch_size)] if batch_size else []
    arguments += ["--estimate", str(estimate)] if estimate else []
    arguments += ["--budget", str(budget)] if budget else []
    arguments += ["--index", str(index)] if index is not None else []
    arguments += ["--save"] if save else []
    arguments += ["--mode", mode]
    done = _run_child(arguments, cap=cap, timeout=timeout)
    if cap and done.returncode != 0:
        # OOM_EXIT with our message, or a crash (a C++ allocation failure can abort): both mean it did not fit
        ours = [line for line in done.stderr.splitlines() if line.startswith("out of memory:")]
        message = ours[-1] if ours else oom_message(index, estimate, cap, budget) + f" (the child died: exit {done.returncode})"
        raise MemoryCapError(f"{message}; {block_dir}; hint: a smaller --batch-size or more "
                             "blocks (--blocks) shrink what one device holds")
    data = _result(done, f"block {block_dir}")
    # above the child's own peak once the runtime is imported, the point the baseline child reports, but
    # in the same process: no other process's variation enters the difference (a tiny block measures ~12 MB)
    imported = data["status_after_import"]["VmHWM"]
    files = (data["status"]["RssFile"] - data["status_after_import"]["RssFile"]
             if "RssFile" in data["status"] and "RssFile" in data["status_after_import"] else None)
    return BlockMeasurement(
        index=data["index"], kind=data["kind"], measured_peak_bytes=data["status"]["VmHWM"] - imported,
        peak_rss_bytes=data["status"]["VmHWM"], peak_virtual_bytes=data["status"]["VmPeak"],
        step_ms=data["step_ms"], first_step_ms=data["first_step_ms"], steps=data["steps"], mode=data["mode"],
        file_backed_bytes=files,
    )


def address_space_cap(resident_budget: int, baseline: Baseline) -> int:
    """The RLIMIT_AS that lets a block use about ``resident_budget`` bytes of memory above the baseline.

    RLIMIT_AS caps address space, not resident memory: the interpreter and ORT's libraries map
    far more than they touch (the baseline's VmPeak), and ORT's arena maps more than it touches
    as it trains (:data:`ADDRESS_SPACE_FACTOR`). So the cap is a coarse stand-in for a board's
    RAM: it proves that a block trains within a bound, not that it would fit byte for byte.
    """
    return baseline.virtual_bytes + int(ADDRESS_SPACE_FACTOR * resident_budget)


def profile_run(run_dir: str | os.PathLike, device: Any, *, steps: int = 5, threads: int = 0, codec: str = "int8",
                batch_size: int | None = None, bp_run: str | os.PathLike | None = None, enforce_budget: bool = False,
                plot: bool = True, progress: bool = True, backend: str = "auto",
                freeze_blocks: tuple[int, ...] = ()) -> dict[str, Any]:
    """Measure and estimate every block of ``run_dir`` on this machine; write profile.json (and .png).

    ``backend``: the runtime that trains the blocks (see :func:`edgebll.backends.open_block`); "auto" with a
    board that trains on the portable graphs (``device.backend``, every aarch64 board) measures those, as
    the board would run them. ``freeze_blocks``: forward blocks measured and estimated as ``--freeze-blocks``
    runs them (eval graph and weights, no training state).
    """
    run_dir = Path(run_dir)
    if backend == "auto" and getattr(device, "backend", None) == "portable":
        backend = "portable"
    config = load_run_config(run_dir)
    bp_dirs = block_dirs(bp_run, feedback_after_each=True) if bp_run is not None else []
    if bp_run is not None and len(bp_dirs) != 1:
        raise EdgeBLLError(f"--bp-run {bp_run}: expected a bp run (one block), found {len(bp_dirs)} blocks; hint: "
                           "edgebll export --method bp --blocks 1 --model <same model> --batch-size <same>")
    baseline = measure_baseline()
    allowance = device.budget_bytes - baseline.rss_bytes
    if allowance <= 0:
        raise EdgeBLLError(f"device {device.name}: budget {device.budget_bytes} bytes is less than the idle runtime "
                           f"alone ({baseline.rss_bytes} bytes); nothing can train there")
    budget = allowance if enforce_budget else None

    def one(folder: Path) -> dict[str, Any]:
        manifest = load_block_manifest(folder, verify_files=False)
        chosen = resolve_backend(backend, manifest.backends(), where=str(folder))
        frozen = manifest.kind == "forward" and manifest.index in freeze_blocks
        estimate = estimate_peak_bytes(folder, batch_size, codec=codec, backend=chosen, frozen=frozen)
        entry: dict[str, Any] = {"index": manifest.index, "kind": getattr(manifest, "kind", "forward"), "backend": chosen,
                                 "frozen": frozen,
                                 "folder": str(folder.relative_to(run_dir.parent) if folder.is_relative_to(run_dir.parent)
                                               else folder),
                                 "estimated_peak_bytes": estimate.total, "estimate": estimate.to_dict()}
        try:
            measured = measure_block(folder, baseline, steps=steps, threads=threads, codec=codec,
                                     batch_size=batch_size, budget=budget, estimate=estimate.total,
                                     index=manifest.index, backend=backend, mode="frozen" if frozen else "train")
        except MemoryCapError as exc:
            entry.update(measured_peak_bytes=None, step_ms=None, fits=False, error=str(exc))
        else:
            entry.update(measured_peak_bytes=measured.measured_peak_bytes, step_ms=measured.step_ms,
                         first_step_ms=measured.first_step_ms, peak_rss_bytes=measured.peak_rss_bytes,
                         peak_virtual_bytes=measured.peak_virtual_bytes,
                         file_backed_bytes=measured.file_backed_bytes,
                         error_percent=round(100 * (estimate.total / measured.measured_peak_bytes - 1), 1),
                         fits=baseline.rss_bytes + measured.measured_peak_bytes <= device.budget_bytes)
        entry["estimate_fits"] = baseline.rss_bytes + estimate.total <= device.budget_bytes
        if progress:
            print(f"  profiled {entry['folder']}", file=sys.stderr)
        return entry

    blocks = [one(folder) for folder in block_dirs(run_dir, feedback_after_each=True)]
    bp = {**one(bp_dirs[0]), "run": str(bp_run)} if bp_run is not None else None
    profile = {
        "format_version": 1, "run": str(run_dir), "model": config.model, "method": config.method,
        "num_blocks": config.blocks, "device": device.to_dict(),
        "batch_size": batch_size or config.batch_size, "codec": codec, "steps": steps, "threads": threads,
        "backend": backend, "freeze_blocks": list(freeze_blocks),
        "memory_pattern": runner_uses_memory_pattern(), "enforce_budget": enforce_budget,
        "address_space_cap_bytes": address_space_cap(allowance, baseline) if enforce_budget else None,
        "baseline": asdict(baseline), "blocks": blocks, "bp": bp, "machine": _machine(),
        # both must fit: under a cap ORT can skip its memory pattern and measure less than it uses uncapped
        "fits": all(b["fits"] and b["estimate_fits"] for b in blocks),
    }
    write_json_atomic(run_dir / PROFILE_NAME, json.dumps(profile, indent=1))
    if plot:
        profile["plot"] = plot_profile(profile, run_dir / PLOT_NAME)
    return profile


def _machine() -> dict[str, Any]:
    return {"machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def this_machine(budget: str | None = None, cores: int | None = None) -> DeviceProfile:
    """The device ``edgebll profile`` measures against without ``--device``: a custom one of ``budget``,
    else this machine with 90 % of its available memory as the budget."""
    # edgebll.devices exists only where edgebll is installed (see edgebll.commands); train and eval run without it
    from edgebll.devices.profiles import custom_profile

    if budget is not None:
        return custom_profile(budget, cores or len(os.sched_getaffinity(0)))
    available = None
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        raise EdgeBLLError("cannot read MemAvailable from /proc/meminfo; hint: pass --device or --budget")
    return custom_profile(int(0.9 * available), cores or len(os.sched_getaffinity(0)), name="this-machine")
