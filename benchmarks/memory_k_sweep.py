"""resnet18 at batch 64 in K = 1, 2, 4, 8 blocks: measured and estimated peak per block against whole-model
backprop; then resnet18 auto-partitioned for the Raspberry Pi Zero 2 W and trained under that board's cap.

1. K table. K = 1 is whole-model backprop (``--method bp``: the whole model and its classifier as
   one ORT training graph); K = 2, 4, 8 are BWBPF splits with MAC-balanced boundaries
   (``edgebll export --blocks K``). Every block is trained for a few steps in its own fresh
   process, as ``edgebll profile`` does (peak resident memory above an idle interpreter with ORT
   imported), next to the estimate its manifest carries. Per K: the largest block's measured peak
   and its ratio to backprop's, every block's estimate error, and step times.
2. ``edgebll export --model resnet18 --device rpi-zero-2w --blocks auto`` (the boundary search),
   then ``edgebll profile RUN --device rpi-zero-2w --enforce-budget``: each block trains under
   RLIMIT_AS = the idle interpreter's address space + 2 x (budget - idle resident), see
   ``edgebll.profiler.address_space_cap``, and its peak resident memory is checked against the
   board's 300 MiB. A literal RLIMIT_AS of 300 MiB is tried too: it cannot work (the idle
   interpreter alone maps more address space than that), and the table says by how much.

Memory numbers are robust to other load on the machine; step times are not (the CI machine has
2 cores shared with other jobs; the load average is recorded with each K).

    python benchmarks/memory_k_sweep.py                  # ~10 minutes on 2 cores
    python benchmarks/memory_k_sweep.py --ks 1 4 --no-board

Writes benchmarks/results/memory_k_sweep.json and .md, and profile_resnet18_rpi-zero-2w.png.
Needs torch (it exports the model).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, describe_machine, machine_info, markdown_table, write_results
from edgebll.devices.profiles import load_profile
from edgebll.export import export_model
from edgebll.export.fit import export_to_fit

from edgebll.errors import MemoryCapError
from edgebll.manifest import load_block_manifest
from edgebll.profiler import Baseline, measure_baseline, measure_block, profile_run
from edgebll.run_folder import block_dir_name

MIB = 2**20
MODEL = "resnet18"
BATCH = 64
BOARD = "rpi-zero-2w"


def measure_run(run: Path, blocks: int, baseline: Baseline, *, steps: int, threads: int) -> dict:
    """Every block of ``run``: measured and estimated peak, error, step time; and the load while it ran."""
    load_before = os.getloadavg()[0]
    rows = []
    for k in range(blocks):
        folder = run / block_dir_name(k)
        manifest = load_block_manifest(folder, verify_files=False)
        measured = measure_block(folder, baseline, steps=steps, threads=threads)
        rows.append({"block": k, "units": manifest.units, "measured_bytes": measured.measured_peak_bytes,
                     "estimated_bytes": manifest.estimated_peak_bytes,
                     "error_percent": round(100 * (manifest.estimated_peak_bytes / measured.measured_peak_bytes - 1), 1),
                     "step_ms": measured.step_ms})
        print(f"  K={blocks} block {k}: measured {measured.measured_peak_bytes / MIB:.1f} MiB, estimated "
              f"{manifest.estimated_peak_bytes / MIB:.1f} MiB ({rows[-1]['error_percent']:+.1f} %), "
              f"{measured.step_ms:.0f} ms", file=sys.stderr)
    largest = max(rows, key=lambda r: r["measured_bytes"])
    return {"blocks": blocks, "per_block": rows, "largest_block": largest["block"],
            "largest_measured_bytes": largest["measured_bytes"], "largest_estimated_bytes": largest["estimated_bytes"],
            "largest_error_percent": largest["error_percent"],
            "slowest_step_ms": max(r["step_ms"] for r in rows), "sum_step_ms": round(sum(r["step_ms"] for r in rows), 1),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def board_run(tmp: Path, *, steps: int, threads: int) -> dict:
    """Auto-partition for the board, profile under its cap, and try the literal cap."""
    board = load_profile(BOARD)
    began = time.perf_counter()
    chosen = export_to_fit(MODEL, out=tmp / f"auto-{BOARD}", devices=board, batch_size=BATCH, progress=False)
    export_seconds = time.perf_counter() - began
    profile = profile_run(chosen.run_dir, board, steps=steps, threads=threads, enforce_budget=True, progress=True)
    for entry in profile["blocks"]:
        entry["units"] = load_block_manifest(chosen.run_dir / block_dir_name(entry["index"]), verify_files=False).units
    if profile.get("plot"):
        shutil.copy(profile["plot"], RESULTS_DIR / f"profile_{MODEL}_{BOARD}.png")
    literal = {"cap_bytes": board.budget_bytes, "idle_virtual_bytes": profile["baseline"]["virtual_bytes"]}
    try:
        measure_block(chosen.run_dir / block_dir_name(0), Baseline(**profile["baseline"]), steps=2, threads=threads,
                      cap=board.budget_bytes, index=0)
        literal["trains"] = True
    except MemoryCapError as exc:
        literal.update(trains=False, error=str(exc).split(";")[0])  # the rest names a temporary folder
    return {"device": board.to_dict(), "partition": chosen.to_dict(), "export_seconds": round(export_seconds, 1),
            "profile": profile, "literal_budget_cap": literal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="block counts (default: 1 2 4 8)")
    parser.add_argument("--steps", type=int, default=5, help="train steps per block (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads (default: 1, steadier on a shared CPU)")
    parser.add_argument("--no-board", action="store_true", help=f"skip the {BOARD} auto-partition run")
    args = parser.parse_args()

    info = machine_info()
    baseline = measure_baseline()
    result: dict = {"machine": info, "model": MODEL, "batch_size": BATCH, "steps": args.steps, "threads": args.threads,
                    "baseline": {"rss_bytes": baseline.rss_bytes, "virtual_bytes": baseline.virtual_bytes}, "k": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            method = "bp" if k == 1 else "bwbpf"
            run = export_model(MODEL, out=Path(tmp) / f"k{k}", method=method, blocks=k, batch_size=BATCH, progress=False)
            result["k"].append({"method": method, **measure_run(run, k, baseline, steps=args.steps,
                                                                 threads=args.threads)})
            shutil.rmtree(run)
        if not args.no_board:
            result["board"] = board_run(Path(tmp), steps=args.steps, threads=args.threads)
    bp = next((r for r in result["k"] if r["blocks"] == 1), None)
    for row in result["k"]:
        row["largest_vs_bp"] = round(row["largest_measured_bytes"] / bp["largest_measured_bytes"], 3) if bp else None
    json_path, md_path = write_results("memory_k_sweep", result, report(result, args))
    print(f"wrote {json_path} and {md_path}")
    return 0


def report(result: dict, args: argparse.Namespace) -> str:
    machine = describe_machine(result["machine"])
    lines = [f"# {MODEL} at batch {BATCH}: peak memory per block for K blocks vs whole-model backprop", "",
             f"Machine: {machine}. {args.steps} steps per block, {args.threads} ORT thread(s), int8 messages; memory "
             f"above an idle interpreter with ORT imported ({result['baseline']['rss_bytes'] / MIB:.1f} MiB resident), "
             "each block in its own fresh process. Command: `python benchmarks/memory_k_sweep.py`. K = 1 is "
             "whole-model backprop (`--method bp`); K > 1 are BWBPF blocks, MAC-balanced.", "",
             "Step times were taken on 2 cores shared with other engineers' jobs (load average in the last column): "
             "read them as rough; the memory columns do not depend on load.", "",
             markdown_table(
                 ["K", "largest block", "measured MiB", "estimated MiB", "error", "vs BP peak",
                  "errors per block", "slowest step ms", "sum of steps ms", "load avg"],
                 [[r["blocks"], r["largest_block"], f"{r['largest_measured_bytes'] / MIB:.1f}",
                   f"{r['largest_estimated_bytes'] / MIB:.1f}", f"{r['largest_error_percent']:+.1f} %",
                   f"{r['largest_vs_bp']:.2f}x" if r["largest_vs_bp"] is not None else "—",
                   " / ".join(f"{b['error_percent']:+.1f}" for b in r["per_block"]), f"{r['slowest_step_ms']:.0f}",
                   f"{r['sum_step_ms']:.0f}", f"{r['load_average'][0]:.1f}–{r['load_average'][1]:.1f}"]
                  for r in result["k"]], "rrrrrrlrrr"), "",
             "Every block:", "",
             markdown_table(["K", "block", "units", "measured MiB", "estimated MiB", "error", "step ms"],
                            [[r["blocks"], b["block"], _units(b["units"]),
                              f"{b['measured_bytes'] / MIB:.1f}", f"{b['estimated_bytes'] / MIB:.1f}",
                              f"{b['error_percent']:+.1f} %", f"{b['step_ms']:.0f}"]
                             for r in result["k"] for b in r["per_block"]], "rrlrrrr")]
    if "board" in result:
        lines += ["", *board_report(result["board"])]
    return "\n".join(lines)


def _units(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def board_report(board: dict) -> list[str]:
    profile, part, literal = board["profile"], board["partition"], board["literal_budget_cap"]
    budget = board["device"]["budget_bytes"]
    idle = profile["baseline"]["rss_bytes"]
    lines = [f"## {MODEL} auto-partitioned for {BOARD}, trained under its cap", "",
             f"`edgebll export --model {MODEL} --device {BOARD} --blocks auto --batch-size {BATCH}` chose "
             f"{len(part['bounds']) - 1} blocks (boundaries {part['bounds']}, slowest block "
             f"{part['max_block_macs'] / 1e6:.1f} M MACs per sample; {part['ranges_estimated']} unit ranges exported "
             f"to estimate, {board['export_seconds']:.0f} s in all). Then `edgebll profile RUN --device {BOARD} "
             f"--enforce-budget --threads {profile['threads']} --steps {profile['steps']}`: every block under "
             f"RLIMIT_AS {profile['address_space_cap_bytes'] / MIB:.0f} MiB (the idle interpreter's "
             f"{profile['baseline']['virtual_bytes'] / MIB:.0f} MiB of address space + 2 x the "
             f"{(budget - idle) / MIB:.0f} MiB the board leaves a block), and its resident peak plus the idle "
             f"runtime ({idle / MIB:.1f} MiB) against the board's {budget / MIB:.0f} MiB budget.", "",
             markdown_table(["block", "units", "measured MiB", "+ idle MiB", "estimated MiB", "error", "step ms",
                             f"trained under the cap, within {budget / MIB:.0f} MiB"],
                            [[b["index"], _units(b["units"]), *(["—", "—"] if b["measured_peak_bytes"] is None else
                                                [f"{b['measured_peak_bytes'] / MIB:.1f}",
                                                 f"{(b['measured_peak_bytes'] + idle) / MIB:.1f}"]),
                              f"{b['estimated_peak_bytes'] / MIB:.1f}",
                              f"{b['error_percent']:+.1f} %" if b.get("error_percent") is not None else "—",
                              f"{b['step_ms']:.0f}" if b.get("step_ms") else "—",
                              "yes" if b["fits"] else f"NO: {b.get('error', 'resident peak over the budget')}"]
                             for b in profile["blocks"]], "rlrrrrrl"), ""]
    estimate_misfits = [b["index"] for b in profile["blocks"] if not b["estimate_fits"]]
    lines.append(f"Every block trained under the cap within the budget: {'yes' if all(b['fits'] for b in profile['blocks']) else 'NO'}"
                 + (f"; but the estimate plus this machine's idle runtime exceeds the budget for block(s) "
                    f"{estimate_misfits} (the exporter reserved an idle runtime of "
                    f"{load_profile(BOARD).idle_bytes / MIB:.0f} MiB, "
                    f"this machine measured {idle / MIB:.1f} MiB)" if estimate_misfits else "") + ".")
    lines += ["", f"A literal RLIMIT_AS of {budget / MIB:.0f} MiB (the budget itself as the address-space cap) on block 0: "
              + ("it trains." if literal["trains"] else
                 f"it does not train: the idle interpreter with ORT imported already maps "
                 f"{literal['idle_virtual_bytes'] / MIB:.0f} MiB of address space, which leaves "
                 f"{(budget - literal['idle_virtual_bytes']) / MIB:.0f} MiB, and ORT's arena maps up to 1.9x what it "
                 f"keeps resident (benchmarks/results/memory.md); the child said: {literal['error']}")]
    return lines


if __name__ == "__main__":
    sys.exit(main())
