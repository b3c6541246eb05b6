"""Peak training memory per block: the estimate of ``edgebll.memory`` against measurements.

Every measurement is taken in a fresh child process as ``edgebll profile`` takes it: peak resident
memory (VmHWM) above an idle child that imported the same runtime.

1. Calibration of the three constants of ``edgebll/memory.py``. RUNTIME_BYTES: the blocks of a
   tiny model (3 conv blocks of 4 to 8 channels, batch 16, bwbpf and bll with its feedback blocks)
   are almost nothing but ORT's own sessions; what each measures beyond the exact parts and its
   (tiny) activations is the runtime, and the median is taken. Then the blocks of cnn-small (4
   blocks) are measured at batch 16, 32, 64 and 128, with ORT's memory pattern on and off; what
   the graph accounts for exactly (parameters, gradients, optimizer state, message buffers) and
   the runtime are subtracted, and the rest is fitted by least squares, over all blocks and batch
   sizes at once, as ``slope * activations`` (activations: the liveness peak of the training
   graph). ARENA_OVERHEAD is the slope without the pattern less one, PATTERN_COPY the difference
   of the two slopes.
2. Validation at batch 64: cnn-small (whose blocks the fit saw) and resnet18 (which it did not),
   4 blocks each, plus each model exported for whole-model backprop (``--method bp``): estimated,
   measured, error; through ``edgebll.profiler`` (BlockRunner as it is), and with the memory
   pattern set the other way. The estimates use the constants as they are in ``edgebll/memory.py``.
3. Address space: the smallest RLIMIT_AS under which a block still trains (bisection to 2 MiB),
   as a multiple of its resident peak above the idle child: what ``address_space_cap`` must allow.

To set the memory pattern, a child wraps ``edgebll.runner.session_options`` so that BlockRunner's
sessions get ``enable_mem_pattern`` as asked; nothing else changes.

    python benchmarks/memory.py                  # everything (~5 minutes on 2 cores)
    python benchmarks/memory.py --models cnn-small --no-address-space

Writes benchmarks/results/memory.json and memory.md. Needs torch (it exports the models).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import describe_machine, machine_info, markdown_table, write_results
from edgebll.export import export_model

from edgebll import memory
from edgebll.errors import MemoryCapError
from edgebll.profiler import Baseline, measure_baseline, measure_block
from edgebll.run_folder import block_dir_name, block_dirs

MIB = 2**20
CALIBRATION_MODEL = "cnn-small"
CALIBRATION_BATCHES = (16, 32, 64, 128)
BATCH = 64
BLOCKS = 4


# A block child whose BlockRunner sessions get enable_mem_pattern as asked (argv: block, batch, pattern).
_PATTERN_CHILD = """
import json, sys
import edgebll.runner as runner

_session_options = runner.session_options

def _options(threads):
    options = _session_options(threads)
    options.enable_mem_pattern = sys.argv[3] == "on"
    return options

runner.session_options = _options  # BlockRunner builds every session's options through it
from edgebll.profile_child import measure_steps
batch = int(sys.argv[2]) or None
print(json.dumps(measure_steps(sys.argv[1], steps=int(sys.argv[4]), threads=int(sys.argv[5]), codec="int8",
                               batch_size=batch, lr=1e-3, save=False)))
"""


def measure(folder: Path, baseline: Baseline, *, pattern: bool | None, steps: int, threads: int,
            batch: int | None = None, backend: str = "ort-training") -> tuple[int, float, int]:
    """(resident peak above the idle child, step ms, virtual peak); ``pattern`` None: the runner as it is."""
    if pattern is None:
        m = measure_block(folder, baseline, steps=steps, threads=threads, batch_size=batch, backend=backend)
        return m.measured_peak_bytes, m.step_ms, m.peak_virtual_bytes
    command = [sys.executable, "-c", _PATTERN_CHILD, str(folder), str(batch or 0), "on" if pattern else "off",
               str(steps), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode < 0:  # killed from outside (seen once on a shared machine): measure again
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{folder}: exit {done.returncode}: {done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return data["status"]["VmHWM"] - baseline.rss_bytes, data["step_ms"], data["status"]["VmPeak"]


def _known_bytes(estimate: memory.MemoryEstimate) -> int:
    """What the graph accounts for exactly, without the measured constants."""
    return estimate.parameters + estimate.gradients + estimate.optimizer_state + estimate.messages


def runtime_constant(runs: list[Path], baseline: Baseline, *, steps: int, threads: int,
                     backend: str = "ort-training") -> dict:
    """ORT's own memory: what the blocks of tiny models measure beyond everything the graph accounts for."""
    pattern = memory.runner_uses_memory_pattern()
    arena = memory.PORTABLE_ARENA_OVERHEAD if backend == "portable" else memory.ARENA_OVERHEAD
    slope = 1 + arena + (memory.PATTERN_COPY if pattern else 0)  # tiny activations: hardly matters
    points = []
    for run in runs:
        for folder in block_dirs(run, feedback_after_each=True):
            estimate = memory.estimate_peak_bytes(folder, backend=backend)
            measured, _, _ = measure(folder, baseline, pattern=None, steps=steps, threads=threads, backend=backend)
            points.append({"block": str(folder.relative_to(run.parent)), "measured_bytes": measured,
                           "known_bytes": _known_bytes(estimate), "activations_bytes": estimate.activations,
                           "runtime_bytes": int(measured - _known_bytes(estimate) - slope * estimate.activations)})
            print(f"  runtime: {points[-1]['block']}: {points[-1]['runtime_bytes'] / MIB:.1f} MiB", file=sys.stderr)
    return {"points": points, "runtime_bytes": int(np.median([p["runtime_bytes"] for p in points]))}


def calibrate(run: Path, baseline: Baseline, *, runtime: int, pattern: bool | None, steps: int, threads: int,
              backend: str = "ort-training") -> dict:
    """Fit slope * activations to what the measurements leave after the exact parts and the runtime."""
    points = []
    for k in range(BLOCKS):
        for batch in CALIBRATION_BATCHES:
            folder = run / block_dir_name(k)
            estimate = memory.estimate_peak_bytes(folder, batch, backend=backend)
            measured, _, _ = measure(folder, baseline, pattern=pattern, steps=steps, threads=threads, batch=batch,
                                     backend=backend)
            points.append({"block": k, "batch_size": batch, "measured_bytes": measured,
                           "known_bytes": _known_bytes(estimate), "activations_bytes": estimate.activations})
            print(f"  calibration (pattern {'on' if pattern else 'off'}) block {k} batch {batch}: "
                  f"{measured / MIB:.1f} MiB", file=sys.stderr)
    activations = np.array([p["activations_bytes"] for p in points], dtype=np.float64)
    measured = np.array([p["measured_bytes"] for p in points], dtype=np.float64)
    rest = measured - np.array([p["known_bytes"] for p in points], dtype=np.float64) - runtime
    slope = float((activations * rest).sum() / (activations * activations).sum())  # least squares through 0
    misfit = rest - slope * activations
    return {"model": CALIBRATION_MODEL, "blocks": BLOCKS, "batch_sizes": list(CALIBRATION_BATCHES),
            "memory_pattern": pattern, "points": points, "slope": round(slope, 4),
            "misfit_max_bytes": int(np.abs(misfit).max()),
            "misfit_max_percent": round(float(100 * np.abs(misfit / measured).max()), 1)}


def validate(run: Path, baseline: Baseline, *, label: str, pattern: bool | None, steps: int, threads: int,
             blocks: int, backend: str = "ort-training") -> list[dict]:
    rows = []
    uses = memory.runner_uses_memory_pattern() if pattern is None else pattern
    for k in range(blocks):
        folder = run / block_dir_name(k)
        estimate = memory.estimate_peak_bytes(folder, memory_pattern=uses, backend=backend)
        measured, step_ms, virtual = measure(folder, baseline, pattern=pattern, steps=steps, threads=threads,
                                             backend=backend)
        rows.append({"run": label, "block": k, "memory_pattern": uses, "through": "profiler" if pattern is None else
                     "pattern child", "measured_bytes": measured, "estimated_bytes": estimate.total,
                     "estimate": estimate.to_dict(), "error_percent": round(100 * (estimate.total / measured - 1), 1),
                     "step_ms": step_ms, "peak_virtual_bytes": virtual})
        print(f"  {label} block {k} (pattern {'on' if uses else 'off'}): measured {measured / MIB:.1f} MiB, "
              f"estimated {estimate.total / MIB:.1f} MiB ({rows[-1]['error_percent']:+.1f} %)", file=sys.stderr)
    return rows


def smallest_cap(folder: Path, baseline: Baseline, measured: int, virtual_peak: int, *, threads: int) -> dict:
    """Bisect the smallest RLIMIT_AS (to 2 MiB) under which ``folder`` trains 3 steps."""
    low, high = baseline.virtual_bytes, virtual_peak + 16 * MIB
    while high - low > 2 * MIB:
        middle = (low + high) // 2
        try:
            measure_block(folder, baseline, steps=3, threads=threads, cap=middle)
            high = middle
        except MemoryCapError:
            low = middle
    return {"block": str(folder), "resident_above_idle_bytes": measured, "smallest_cap_bytes": high,
            "cap_above_idle_virtual_bytes": high - baseline.virtual_bytes,
            "factor": round((high - baseline.virtual_bytes) / measured, 3)}


def _export_tiny(out: Path, method: str) -> Path:
    """The tiny 3-block conv model of the tests (tests/conftest.py), batch 16."""
    import torch
    from edgebll.export.models import conv_bn_relu
    from torch import nn

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)),
             nn.Sequential(*conv_bn_relu(8, 8, 2))]
    return export_model(units, out=out, method=method, blocks=3, batch_size=16, lr=0.01, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn-small", "resnet18"])
    parser.add_argument("--steps", type=int, default=5, help="train steps per measurement (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads (default: 1, steadier on a shared CPU)")
    parser.add_argument("--no-address-space", action="store_true", help="skip the RLIMIT_AS bisection")
    parser.add_argument("--no-calibration", action="store_true", help="skip the batch-size sweep")
    parser.add_argument("--backend", choices=("ort-training", "portable"), default="ort-training",
                        help="the runtime measured: portable calibrates PORTABLE_RUNTIME_BYTES and "
                             "PORTABLE_ARENA_OVERHEAD (memory pattern as the runner sets it, no address-space "
                             "search) and writes memory_portable.json/.md (default: ort-training)")
    args = parser.parse_args()
    portable = args.backend == "portable"

    info = machine_info()
    baseline = measure_baseline()
    runner_pattern = memory.runner_uses_memory_pattern()
    result: dict = {"machine": info, "baseline": {"rss_bytes": baseline.rss_bytes,
                                                  "virtual_bytes": baseline.virtual_bytes},
                    "backend": args.backend,
                    "constants": {"RUNTIME_BYTES": memory.RUNTIME_BYTES, "ARENA_OVERHEAD": memory.ARENA_OVERHEAD,
                                  "PATTERN_COPY": memory.PATTERN_COPY,
                                  "PORTABLE_RUNTIME_BYTES": memory.PORTABLE_RUNTIME_BYTES,
                                  "PORTABLE_ARENA_OVERHEAD": memory.PORTABLE_ARENA_OVERHEAD},
                    "runner_memory_pattern": runner_pattern, "threads": args.threads, "steps": args.steps,
                    "calibration": {}, "validation": [], "address_space": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for model in args.models:
            runs[model] = export_model(model, out=Path(tmp) / model, blocks=BLOCKS, batch_size=BATCH, progress=False)
            runs[f"{model} bp"] = export_model(model, out=Path(tmp) / f"{model}-bp", method="bp", blocks=1,
                                               batch_size=BATCH, progress=False)
        if not args.no_calibration:
            tiny = [_export_tiny(Path(tmp) / f"tiny-{method}", method) for method in ("bwbpf", "bll")]
            runtime = runtime_constant(tiny, baseline, steps=args.steps, threads=args.threads, backend=args.backend)
            fits = {pattern: calibrate(runs[CALIBRATION_MODEL], baseline, runtime=runtime["runtime_bytes"],
                                       pattern=pattern, steps=args.steps, threads=args.threads, backend=args.backend)
                    for pattern in ((None,) if portable else (True, False))}
            result["calibration"] = {
                "runtime": runtime, "pattern_off": fits[None], "runtime_bytes": runtime["runtime_bytes"],
                "arena_overhead": round(fits[None]["slope"] - 1, 3),
            } if portable else {
                "runtime": runtime, "pattern_on": fits[True], "pattern_off": fits[False],
                "runtime_bytes": runtime["runtime_bytes"],
                "arena_overhead": round(fits[False]["slope"] - 1, 3),
                "pattern_copy": round(fits[True]["slope"] - fits[False]["slope"], 3),
            }
        for label, run in runs.items():
            for pattern in (None,) if portable else (None, not runner_pattern):
                result["validation"] += validate(run, baseline, label=label, pattern=pattern, steps=args.steps,
                                                 threads=args.threads, blocks=1 if label.endswith(" bp") else BLOCKS,
                                                 backend=args.backend)
        if not args.no_address_space and not portable:
            for row in result["validation"]:
                if row["run"].endswith(" bp") or row["through"] != "profiler" or row["block"] not in (0, BLOCKS - 1):
                    continue
                folder = runs[row["run"]] / block_dir_name(row["block"])
                found = smallest_cap(folder, baseline, row["measured_bytes"], row["peak_virtual_bytes"],
                                     threads=args.threads)
                result["address_space"].append({"run": row["run"], **found})
                print(f"  smallest cap {row['run']} block {row['block']}: x{found['factor']}", file=sys.stderr)

    setting = (f"Machine: {describe_machine(info)}. Backend {args.backend}. Batch {BATCH}, int8 messages, "
               f"{args.steps} steps, "
               f"{args.threads} ORT thread(s); memory above an idle interpreter with ORT imported "
               f"({baseline.rss_bytes / MIB:.1f} MiB resident). Command: `python benchmarks/memory.py"
               f"{' --backend portable' if portable else ''}`.")
    lines = ["# Peak training memory per block: estimate vs measurement", "", setting, ""]
    if result["calibration"] and portable:
        c, off = result["calibration"], result["calibration"]["pattern_off"]
        lines += [(f"Calibration: runtime {c['runtime_bytes'] / MIB:.1f} MiB (median over "
                   f"{len(c['runtime']['points'])} tiny blocks); {CALIBRATION_MODEL}, {BLOCKS} blocks, batch "
                   f"{', '.join(map(str, CALIBRATION_BATCHES))}: {off['slope']:.3f} x activations (largest misfit "
                   f"{off['misfit_max_bytes'] / MIB:.1f} MiB, {off['misfit_max_percent']} %). So "
                   f"PORTABLE_RUNTIME_BYTES {c['runtime_bytes'] / MIB:.1f} MiB, PORTABLE_ARENA_OVERHEAD "
                   f"{c['arena_overhead']:.2f}; edgebll/memory.py has {memory.PORTABLE_RUNTIME_BYTES / MIB:.1f} MiB, "
                   f"{memory.PORTABLE_ARENA_OVERHEAD}."), ""]
    elif result["calibration"]:
        c = result["calibration"]
        on, off = c["pattern_on"], c["pattern_off"]
        lines += [(f"Calibration: runtime {c['runtime_bytes'] / MIB:.1f} MiB (median over "
                  f"{len(c['runtime']['points'])} tiny blocks); {CALIBRATION_MODEL}, {BLOCKS} blocks, batch "
                  f"{', '.join(map(str, CALIBRATION_BATCHES))}: memory pattern on: {on['slope']:.3f} x activations "
                  f"(largest misfit {on['misfit_max_bytes'] / MIB:.1f} MiB, {on['misfit_max_percent']} %); off: "
                  f"{off['slope']:.3f} x activations (largest misfit {off['misfit_max_bytes'] / MIB:.1f} MiB, "
                  f"{off['misfit_max_percent']} %). So RUNTIME_BYTES {c['runtime_bytes'] / MIB:.1f} MiB, "
                  f"ARENA_OVERHEAD {c['arena_overhead']:.2f}, PATTERN_COPY {c['pattern_copy']:.2f}; edgebll/memory.py "
                  f"has {memory.RUNTIME_BYTES / MIB:.1f} MiB, {memory.ARENA_OVERHEAD}, {memory.PATTERN_COPY}."), ""]
    lines.append(f"The runners run ORT with the memory pattern {'on' if runner_pattern else 'off'}; rows marked "
                 "'pattern child' set it the other way.")
    lines.append("")
    lines.append(markdown_table(
        ["run", "block", "memory pattern", "measured MiB", "estimated MiB", "error", "activations MiB", "step ms"],
        [[r["run"], r["block"], ("on" if r["memory_pattern"] else "off") + ("" if r["through"] == "profiler" else
                                                                            " (pattern child)"),
          f"{r['measured_bytes'] / MIB:.1f}", f"{r['estimated_bytes'] / MIB:.1f}", f"{r['error_percent']:+.1f} %",
          f"{r['estimate']['activations'] / MIB:.1f}", f"{r['step_ms']:.0f}"]
         for r in result["validation"]], "lrlrrrrr"))
    if result["address_space"]:
        lines += ["", "Smallest RLIMIT_AS that still trains, above the idle child's address space, per MiB resident:", "",
                  markdown_table(["run", "block", "resident MiB", "cap above idle MiB", "factor"],
                                 [[a["run"], Path(a["block"]).name, f"{a['resident_above_idle_bytes'] / MIB:.1f}",
                                   f"{a['cap_above_idle_virtual_bytes'] / MIB:.1f}", f"{a['factor']:.2f}"]
                                  for a in result["address_space"]], "llrrr")]
    json_path, md_path = write_results("memory_portable" if portable else "memory", result, "\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
