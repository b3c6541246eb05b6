"""Measure the peak memory and step time of every block of a run, next to the estimate and a device budget.

``edgebll profile RUN --device rpi4-4gb`` trains each block for a few steps in a fresh child
process (``python -m edgebll.profiler child BLOCK``), exactly as a device would: the input arrives
as a codec frame and is decoded, BlockRunner takes the step, the output is encoded. The child
reports its peak resident memory (VmHWM) and the parent subtracts the peak of an idle child that
imported the same modules (numpy, edgebll's runtime, ONNX Runtime): the difference is what the
block costs, comparable with :func:`edgebll.memory.estimate_peak_bytes`. Writes
``RUN/profile.json`` and, with matplotlib, ``RUN/profile.png``.

``--enforce-budget`` also runs each child under a hard cap (RLIMIT_AS, see :func:`address_space_cap`),
so a block that cannot train within the device's budget fails here with "out of memory: ...". A
BLL run's feedback blocks (``block-k/feedback``) are measured like the forward blocks.

Imports only the standard library at module level: ``edgebll --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgebll.errors import EdgeBLLError, MemoryCapError

PROFILE_NAME = "profile.json"
PLOT_NAME = "profile.png"
OOM_EXIT = 3
"""Exit status of a child that ran out of memory under its cap."""

ADDRESS_SPACE_FACTOR = 2.0
"""Address space a block maps per byte it keeps resident. ORT's arena grows in regions of
doubling size and touches only part of the last one, so the smallest RLIMIT_AS under which a
block trains is up to 1.9 times its resident peak above the idle interpreter
(benchmarks/results/memory.json, "address_space"): a cap gives it twice its resident budget."""

_OOM_MARKERS = ("bad_alloc", "bad allocation", "failed to allocate", "cannot allocate memory", "memoryerror",
                "out of memory", "failed to map segment", "resource temporarily unavailable", "std::length_error")


# -- measurements, in the child -----------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmHWM (peak resident), VmRSS, VmPeak (peak virtual) and VmSize of this process, in bytes."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "VmPeak", "VmSize"):
                    values[key] = int(line.split()[1]) * 1024
    except OSError as exc:
        raise EdgeBLLError(f"profiling reads /proc/self/status, which this system lacks ({exc}); it needs Linux") from exc
    return values


def _import_runtime() -> None:
    """What both the baseline child and a block child import before anything is measured."""
    import numpy  # noqa: F401

    from edgebll import codec  # noqa: F401
    from edgebll.backends import open_block  # noqa: F401
    from edgebll.ort_training import training_api, training_available

    if training_available():  # also for the portable backend: without the torch-free shim, the training
        training_api()         # build's onnxruntime/__init__ imports torch (+250 MB that a board never pays)
    import onnxruntime  # noqa: F401


def _inputs(manifest: Any, batch: int, seed: int = 0) -> list[Any]:
    """Random inputs for every graph input of the block, by role: messages normal, labels in range."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = manifest.output("logits")
    classes = int(logits.shape[-1]) if logits is not None and isinstance(logits.shape[-1], int) else 10
    arrays = []
    for spec in manifest.inputs:
        shape = (batch, *[int(d) for d in spec.per_sample_shape()])
        if spec.dtype == "int64":
            arrays.append(rng.integers(0, classes, size=shape, dtype=np.int64))
        elif spec.role == "target":
            # one one-hot row per label: [B, classes], or [B, T, classes] for a sequence model's per-token targets
            arrays.append(np.eye(classes, dtype=np.float32)[rng.integers(0, classes, size=shape[:-1])])
        else:
            arrays.append(rng.standard_normal(shape, dtype=np.float32))
    return arrays


def _train_child(block_dir: str, *, steps: int, threads: int, codec: str, batch_size: int | None, lr: float,
                 save: bool, mode: str = "train", backend: str = "auto") -> dict[str, Any]:
    """Train ``block_dir`` for ``steps`` steps as a device would (``mode`` "eval": run its eval graph
    instead, as ``edgebll eval`` does; "frozen": as a block of ``--freeze-blocks`` runs, loaded without
    its training graph); returns the measurements."""
    _import_runtime()
    imported = _status()
    from edgebll import codec as message_codec
    from edgebll.backends import open_block

    runner = open_block(block_dir, threads=threads, load_trained=False, backend=backend, frozen=mode == "frozen")
    loaded = _status()
    manifest = runner.manifest
    batch = batch_size or manifest.batch_size
    arrays = _inputs(manifest, batch)
    kind = getattr(manifest, "kind", "forward")
    if mode != "train" and kind != "forward":
        raise EdgeBLLError(f"{block_dir} is a {kind} block: only forward blocks are evaluated (BLL's feedback "
                           "blocks are not needed at test time)")
    # a block but the first receives its message as a frame (the one a neighbour would send)
    frame_in = message_codec.encode(arrays[0], codec) if (manifest.index > 0 or kind != "forward") else None
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        x = message_codec.decode(frame_in) if frame_in is not None else arrays[0]
        result = (runner.eval_step(x, *arrays[1:]) if mode == "eval" else runner.frozen_step(x, *arrays[1:])
                  if mode == "frozen" else runner.train_step(x, *arrays[1:], lr))
        frame_out = message_codec.encode(result.message, codec) if result.message is not None else None
        times.append(time.perf_counter() - began)
        del x, result, frame_out  # a device loop drops this step's buffers before the next message arrives
    if save:
        runner.save(epoch=0)
    end = _status()
    return {
        "index": manifest.index, "kind": kind, "mode": mode, "batch_size": batch, "steps": steps, "threads": threads,
        "codec": codec, "backend": runner.backend, "status_after_import": imported, "status_after_load": loaded, "status": end,
        "step_ms": round(1000 * statistics.median(times[1:] or times), 2), "first_step_ms": round(1000 * times[0], 2),
    }


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _child_main(args: argparse.Namespace) -> int:
    # composed before the cap: once memory runs out, formatting the message could fail too
    message = _oom_message(args.index, args.estimate, args.cap, args.budget) if args.cap else ""
    if args.cap:
        import resource

        # before any import that maps memory: everything this process ever maps counts
        resource.setrlimit(resource.RLIMIT_AS, (args.cap, args.cap))
    try:
        if args.what == "baseline":
            _import_runtime()
            result: dict[str, Any] = {"status": _status()}
        else:
            result = _train_child(args.block, steps=args.steps, threads=args.threads, codec=args.codec,
                                  batch_size=args.batch_size, lr=args.lr, save=args.save,
                                  mode=args.mode, backend=args.backend)
    except Exception as exc:
        if args.cap and _is_out_of_memory(exc):
            os.write(2, message.encode() + b"\n")
            try:
                os.write(2, f"  ({type(exc).__name__}: {str(exc)[:300]})\n".encode())
            except MemoryError:
                pass
            return OOM_EXIT
        raise
    print(json.dumps(result))
    return 0


def _oom_message(index: int | None, estimate: int | None, cap: int, budget: int | None = None) -> str:
    from edgebll.devices.profiles import format_bytes

    needs = f"needs about {format_bytes(estimate)}" if estimate else "needs more"
    limit = f"{format_bytes(budget)} (RLIMIT_AS {format_bytes(cap)})" if budget else f"{format_bytes(cap)} of address space"
    return f"out of memory: block {index if index is not None else '?'} {needs}, cap {limit}"


# -- measurements, in the parent ----------------------------------------------------------------

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
    """Peak resident memory above the baseline."""
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


def _run_child(arguments: list[str], *, cap: int | None, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgebll.profiler", "child", *arguments] + (["--cap", str(cap)] if cap else [])
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
        message = ours[-1] if ours else _oom_message(index, estimate, cap, budget) + f" (the child died: exit {done.returncode})"
        raise MemoryCapError(f"{message}; {block_dir}; hint: a smaller --batch-size or more "
                             "blocks (--blocks) shrink what one device holds")
    data = _result(done, f"block {block_dir}")
    return BlockMeasurement(
        index=data["index"], kind=data["kind"], measured_peak_bytes=data["status"]["VmHWM"] - baseline.rss_bytes,
        peak_rss_bytes=data["status"]["VmHWM"], peak_virtual_bytes=data["status"]["VmPeak"],
        step_ms=data["step_ms"], first_step_ms=data["first_step_ms"], steps=data["steps"], mode=data["mode"],
    )


def address_space_cap(resident_budget: int, baseline: Baseline) -> int:
    """The RLIMIT_AS that lets a block use about ``resident_budget`` bytes of memory above the baseline.

    RLIMIT_AS caps address space, not resident memory: the interpreter and ORT's libraries map
    far more than they touch (the baseline's VmPeak), and ORT's arena maps more than it touches
    as it trains (:data:`ADDRESS_SPACE_FACTOR`). So the cap is a coarse stand-in for a board's
    RAM: it proves that a block trains within a bound, not that it would fit byte for byte.
    """
    return baseline.virtual_bytes + int(ADDRESS_SPACE_FACTOR * resident_budget)


# -- the whole run ------------------------------------------------------------------------------

def _block_dirs(run_dir: Path) -> list[Path]:
    """Every block folder of a run: block-0 .. block-(K-1), each followed by its feedback block if any."""
    from edgebll.manifest import FEEDBACK_DIR, block_dir_name, load_run_config

    config = load_run_config(run_dir)
    folders = []
    for k in range(int(config["blocks"])):
        folders.append(run_dir / block_dir_name(k))
        feedback = run_dir / block_dir_name(k) / FEEDBACK_DIR
        if (feedback / "manifest.json").is_file():
            folders.append(feedback)
    return folders


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
    from edgebll.manifest import load_block_manifest, load_run_config, write_json_atomic
    from edgebll.backends import resolve_backend
    from edgebll.memory import estimate_peak_bytes, runner_uses_memory_pattern

    run_dir = Path(run_dir)
    if backend == "auto" and getattr(device, "backend", None) == "portable":
        backend = "portable"
    config = load_run_config(run_dir)
    bp_dirs = _block_dirs(Path(bp_run)) if bp_run is not None else []
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
                         error_percent=round(100 * (estimate.total / measured.measured_peak_bytes - 1), 1),
                         fits=baseline.rss_bytes + measured.measured_peak_bytes <= device.budget_bytes)
        entry["estimate_fits"] = baseline.rss_bytes + estimate.total <= device.budget_bytes
        if progress:
            print(f"  profiled {entry['folder']}", file=sys.stderr)
        return entry

    blocks = [one(folder) for folder in _block_dirs(run_dir)]
    bp = {**one(bp_dirs[0]), "run": str(bp_run)} if bp_run is not None else None
    profile = {
        "format_version": 1, "run": str(run_dir), "model": config.get("model"), "method": config.get("method"),
        "num_blocks": int(config["blocks"]), "device": device.to_dict(),
        "batch_size": batch_size or int(config["batch_size"]), "codec": codec, "steps": steps, "threads": threads,
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
    import platform

    return {"machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def plot_profile(profile: dict[str, Any], path: Path) -> str | None:
    """Bars per block (measured, estimated) and the device's budget line; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    entries = profile["blocks"] + ([{**profile["bp"], "label": "bp"}] if profile.get("bp") else [])
    labels = [e.get("label") or (f"fb {e['index']}" if e["kind"] == "feedback" else f"block {e['index']}")
              for e in entries]
    mib = 2**20
    measured = [(e["measured_peak_bytes"] or 0) / mib for e in entries]
    estimated = [e["estimated_peak_bytes"] / mib for e in entries]
    allowance = (profile["device"]["budget_bytes"] - profile["baseline"]["rss_bytes"]) / mib
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2), 3.8))
    xs = range(len(entries))
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], estimated, width=0.4, label="estimated")
    if allowance <= 4 * max(measured + estimated):
        ax.axhline(allowance, color="crimson", linestyle="--",
                   label=f"{profile['device']['name']} budget − idle runtime ({allowance:.0f} MiB)")
    else:
        ax.set_title(f"{profile['device']['name']} budget − idle runtime: {allowance:.0f} MiB (off the chart)",
                     fontsize=9, loc="right")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("peak memory above idle runtime (MiB)")
    ax.set_title(f"{profile['model']} · {profile['method']} · batch {profile['batch_size']}", fontsize=10, loc="left")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def format_profile_table(profile: dict[str, Any]) -> str:
    """The table ``edgebll profile`` prints."""
    mib = 2**20
    header = (f"{'block':>10}  {'measured':>9}  {'estimated':>9}  {'error':>7}  {'step':>8}  "
              f"fits {profile['device']['name']} (measured/estimated)")
    rows = [header]
    entries = profile["blocks"] + ([{**profile["bp"], "index": "bp", "kind": "forward"}] if profile.get("bp") else [])
    for e in entries:
        name = f"fb {e['index']}" if e["kind"] == "feedback" else f"{e['index']}{' (frozen)' if e.get('frozen') else ''}"
        if e["measured_peak_bytes"] is None:
            rows.append(f"{name:>10}  {'—':>9}  {e['estimated_peak_bytes'] / mib:>5.1f} MiB  {'':>7}  {'':>8}  "
                        f"no: {e['error']}")
            continue
        fits = "/".join("yes" if ok else "NO" for ok in (e["fits"], e["estimate_fits"]))
        rows.append(f"{name:>10}  {e['measured_peak_bytes'] / mib:>5.1f} MiB  {e['estimated_peak_bytes'] / mib:>5.1f} MiB  "
                    f"{e['error_percent']:>+6.1f}%  {e['step_ms']:>5.0f} ms  {fits}")
    base = profile["baseline"]
    rows.append(f"above an idle runtime of {base['rss_bytes'] / mib:.1f} MiB resident; device budget "
                f"{profile['device']['budget_bytes'] / mib:.0f} MiB; batch {profile['batch_size']}, {profile['codec']} "
                f"messages, {profile['steps']} steps per block")
    rows.append(f"(on the board itself, `idle_runtime_bytes = {base['rss_bytes']}` in its profile's TOML makes the "
                "exporter reserve this idle runtime instead of the default)")
    if profile["enforce_budget"] and profile["memory_pattern"]:
        rows.append("note: under the cap ORT skips its memory pattern when it cannot map it, so a block can measure "
                    "less here than it uses uncapped; the estimate counts the pattern")
    return "\n".join(rows)


# -- command line -------------------------------------------------------------------------------

def add_commands(sub: Any) -> None:
    """Add ``devices`` and ``profile`` to the ``edgebll`` command line."""
    from edgebll.backends import add_backend_options, block_list

    p = sub.add_parser("devices", help="list the device profiles (RAM, training budget, cores, link)",
                       description="The shipped device profiles (devices/boards/*.toml).")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("profile", help="measure each block's peak memory and step time vs the estimate and a device",
                       description="Train every block of RUN for a few steps, each in a fresh process, and measure its "
                                   "peak resident memory above an idle runtime; compare with the estimate and the "
                                   "device's budget. With --device of an aarch64 board, --backend auto measures the "
                                   "portable graphs, which that board trains with. Writes RUN/profile.json and "
                                   "RUN/profile.png.")
    p.add_argument("run", help="run folder written by `edgebll export`")
    p.add_argument("--device", default=None, help="shipped profile name or TOML path (default: this machine, or "
                   "--budget/--cores)")
    p.add_argument("--budget", default=None, help="a custom device's training budget, e.g. 300MB or 1.5GiB")
    p.add_argument("--cores", type=int, default=None, help="a custom device's cores (default: this machine's)")
    p.add_argument("--steps", type=int, default=5, help="train steps per block (default: 5; the peak settles by 3)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: 0 = ORT decides)")
    p.add_argument("--codec", default="int8", help="message codec (default: int8)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the exported one)")
    p.add_argument("--bp-run", default=None, metavar="RUN", help="a bp export of the same model to compare with")
    p.add_argument("--enforce-budget", action="store_true",
                   help="run each block under a hard memory cap derived from the device budget (RLIMIT_AS)")
    p.add_argument("--no-plot", action="store_true", help="skip RUN/profile.png")
    p.add_argument("--json", action="store_true", help="print profile.json instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--freeze-blocks", type=block_list, default=(), metavar="K[,K...]",
                   help="forward blocks measured as `edgebll train --freeze-blocks` runs them: eval graph and weights, "
                        "no gradients or optimizer state")
    add_backend_options(p)


def _this_machine(budget: str | None, cores: int | None) -> Any:
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


def run_command(args: argparse.Namespace) -> int:
    """Carry out ``edgebll devices`` or ``edgebll profile``."""
    from edgebll.devices.profiles import format_bytes, list_profiles, load_profile

    if args.command == "devices":
        profiles = list_profiles()
        if args.json:
            print(json.dumps([p.to_dict() for p in profiles], indent=1))
            return 0
        print(f"{'name':<21} {'RAM':>9} {'budget':>10} {'cores':>5}  {'arch':<8} link")
        for p in profiles:
            link = f"{p.link[0]} {p.link[1] * 8 / 1e6:.0f} Mbit/s" if p.link else "—"
            print(f"{p.name:<21} {format_bytes(p.ram_bytes):>9} {format_bytes(p.budget_bytes):>10} {p.cores:>5}  "
                  f"{p.arch:<8} {link}")
        return 0
    if args.device and args.budget:
        raise EdgeBLLError("--device and --budget contradict each other; choose one")
    device = load_profile(args.device) if args.device else _this_machine(args.budget, args.cores)
    profile = profile_run(args.run, device, steps=args.steps, threads=args.threads, codec=args.codec,
                          batch_size=args.batch_size, bp_run=args.bp_run, enforce_budget=args.enforce_budget,
                          plot=not args.no_plot, progress=not args.no_progress, backend=args.backend,
                          freeze_blocks=args.freeze_blocks)
    if args.json:
        print(json.dumps(profile, indent=1))
        return 0
    print(format_profile_table(profile))
    written = [str(Path(args.run) / PROFILE_NAME)] + ([profile["plot"]] if profile.get("plot") else [])
    if not args.no_plot and not profile.get("plot"):
        written.append("(no plot: pip install 'edgebll[plot]')")
    print("wrote " + ", ".join(written))
    return 0 if profile["fits"] else 1


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgebll.profiler child",
                                     description="One measurement in this process (used by `edgebll profile`).")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("baseline", help="import the runtime and report memory").add_argument("--cap", type=int, default=None)
    p = sub.add_parser("block", help="train one block for a few steps and report memory and step time")
    p.add_argument("block")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--codec", default="int8")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save", action="store_true", help="save trained/checkpoint at the end")
    p.add_argument("--mode", choices=("train", "eval", "frozen"), default="train",
                   help="train steps, the eval graph, or frozen steps (the eval graph, loaded without training state)")
    p.add_argument("--backend", default="auto", help="the runtime that trains the block (see edgebll.backends)")
    p.add_argument("--cap", type=int, default=None, help="RLIMIT_AS in bytes, set before anything is imported")
    p.add_argument("--estimate", type=int, default=None, help="estimated peak (for the out-of-memory message)")
    p.add_argument("--budget", type=int, default=None, help="resident budget the cap stands for (for the message)")
    p.add_argument("--index", type=int, default=None, help="block index (for the out-of-memory message)")
    return parser


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        sys.exit("usage: python -m edgebll.profiler child {baseline,block} ...  (run `edgebll profile` instead)")
    namespace = _child_parser().parse_args(sys.argv[2:])
    for key, default in (("index", None), ("estimate", None), ("budget", None)):
        if not hasattr(namespace, key):
            setattr(namespace, key, default)
    sys.exit(_child_main(namespace))
