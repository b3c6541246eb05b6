"""Time one training step per block: onnxruntime-training (``BlockRunner``), the portable graph on
onnxruntime (``PortableRunner``), and torch eager.

For every block of each model (exported with ``--blocks`` blocks, method bwbpf), the three runtimes
take the same step: forward, local cross-entropy, backward and an AdamW update, at the same batch
size and the same number of threads, on a random batch of the block's real input shape. After
``--warmup`` untimed steps, ``--repeats`` rounds are timed, each runtime taking one step per
round; the median and the inter-quartile range of each runtime's steps are reported, and each
ratio is the median of the per-round ratios. The torch blocks are built with the export's seed,
so the runtimes train the same weights.

Timings mean something only on an otherwise idle CPU. Each row records how many cores other
processes kept busy while it was timed; a contended row is timed again after a wait for an idle
CPU (``--retries``, ``--retry-budget``), and one that stays contended is marked in the table.

    python benchmarks/step_speed.py                       # the defaults (what `make bench` runs)
    python benchmarks/step_speed.py --models cnn-small --threads 1 2 4 --repeats 20

Writes benchmarks/results/step_speed.json and step_speed.md (``--name`` changes the file names).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import describe_machine, machine_info, markdown_table, other_processes_cpu, write_results
from edgebll.export import MODELS, build_blocks, build_model, export_model
from edgebll.portable import PortableRunner
from edgebll.profiler import measure_baseline, measure_block
from edgebll.run_folder import block_dir_name
from edgebll.runner import BlockRunner

# resnet18 at batch 64 takes seconds per step on a small CPU: fewer timed steps keep the default
# run within minutes. --repeats overrides these for every model.
DEFAULT_REPEATS = {"cnn-small": 10, "resnet18": 7}
FALLBACK_REPEATS = 10
METHOD = "bwbpf"
BUSY_CORES = 0.2
"""Cores kept busy by other processes above which a measurement is retried, and flagged if it stays so."""
IDLE_WAIT_S = 20.0
"""Longest wait for an idle CPU before a retry."""


@dataclass(kw_only=True, slots=True)
class Timing:
    """Seconds of the timed steps of one runtime."""

    median_s: float
    q25_s: float
    q75_s: float
    steps_s: list[float]
    cpu_median_s: float
    """Median CPU time of the process per step: about threads x wall time when nothing else competes."""
    others_cores: float | None
    """Cores other processes kept busy meanwhile (0 on an idle machine)."""

    @property
    def iqr_s(self) -> float:
        return self.q75_s - self.q25_s


@dataclass(kw_only=True, slots=True)
class Row:
    """One model / block / thread count."""

    model: str
    block: int
    units: list[str]
    params: int
    input_shape: list[int]
    threads: int
    batch_size: int
    repeats: int
    attempts: int
    """How many times the row was timed: a contended attempt is retried (--retries), the least contended kept."""
    ort_ms: float
    ort_iqr_ms: float
    torch_ms: float
    torch_iqr_ms: float
    portable_ms: float
    portable_iqr_ms: float
    ort_over_torch: float
    """Median over the rounds of ORT's step time over torch's in the same round (so are the other ratios)."""
    portable_over_torch: float
    portable_over_ort: float
    ort_cpu_ms: float
    torch_cpu_ms: float
    portable_cpu_ms: float
    ort_others_cores: float | None
    torch_others_cores: float | None
    portable_others_cores: float | None
    ort_steps_ms: list[float]
    torch_steps_ms: list[float]
    portable_steps_ms: list[float]
    ort_peak_rss_mib: float | None
    """Peak resident memory of a process that trains only this block (interpreter included), one thread."""
    portable_peak_rss_mib: float | None


def _timing(times: list[float], cpu_times: list[float], others_cores: float | None) -> Timing:
    q25, _, q75 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return Timing(median_s=statistics.median(times), q25_s=q25, q75_s=q75, steps_s=times,
                  cpu_median_s=statistics.median(cpu_times), others_cores=others_cores)


SETTLE_S = 0.05
"""Idle seconds before each timed step, so that the runtime timed before it has stopped spinning."""


def time_interleaved(steps: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, Timing]:
    """Run each step ``warmup`` times untimed, then time ``repeats`` rounds in which every step runs once.

    Rounds, not one runtime's steps after another's: a shared machine's speed changes over seconds
    (measured here: the same step 70 ms for a while, then 140 ms), and within a round every runtime
    meets the same conditions, so the per-round ratios (:func:`round_ratio`) hold where the medians
    drift.

    Each timed step starts ``SETTLE_S`` after the one before: torch's OpenMP workers spin for some
    milliseconds after its step ends, and onnxruntime's Conv that ran next, sharing their cores,
    took 1.3-1.4x its time alone (a gap of 5 ms or more restores it).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu_times: dict[str, list[float]] = {k: [] for k in steps}
    with other_processes_cpu() as others:
        for _ in range(repeats):
            for name, step in steps.items():
                time.sleep(SETTLE_S)
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    return {k: _timing(times[k], cpu_times[k], others.cores) for k in steps}


def round_ratio(a: Timing, b: Timing) -> float:
    """The median over the rounds of ``a``'s step time over ``b``'s in the same round."""
    return round(statistics.median(x / y for x, y in zip(a.steps_s, b.steps_s)), 3)


def torch_step(block: torch.nn.Module, x: np.ndarray, labels: np.ndarray, *, lr: float,
               device: str = "cpu") -> Callable[[], float]:
    """The same step in torch eager: forward, loss, backward, AdamW (the export's settings), with the runners'
    traffic: the batch from host memory, the outputs back to it (no copies on the CPU).

    The block is trained in place; a deep copy per call would cost memory and change nothing
    about the speed.
    """
    block.to(device).train()
    # OptimizerConfig's defaults: torch's AdamW formula, eps 1e-8, no weight decay
    optimizer = torch.optim.AdamW(block.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(labels)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        outputs = block(inputs.to(device), targets.to(device))
        outputs[0].backward()
        optimizer.step()
        host = [o.detach().cpu() for o in outputs]  # on a GPU: waits for it, as the runners' outputs do
        return float(host[0])  # the ORT steps also hand their loss back as a Python float

    return step


def time_runtimes(block_dir: Path, block: torch.nn.Module, x: np.ndarray, labels: np.ndarray, *, threads: int,
                  lr: float, warmup: int, repeats: int) -> dict[str, Timing]:
    """Time onnxruntime-training (``BlockRunner``), the portable graph (``PortableRunner``) and torch eager in
    rounds (:func:`time_interleaved`), each with ``threads`` threads (fresh ORT sessions per call)."""
    torch.set_num_threads(threads)
    ort = BlockRunner(block_dir, threads=threads, load_trained=False)
    portable = PortableRunner(block_dir, threads=threads, load_trained=False)
    steps = {"ort": functools.partial(ort.train_step, x, labels, lr),
             "portable": functools.partial(portable.train_step, x, labels, lr),
             "torch": torch_step(block, x, labels, lr=lr)}
    timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
    del ort, portable, steps  # their thread pools must not outlive the row
    gc.collect()
    return timings


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1e3, 3)


@dataclass(slots=True)
class RetryBudget:
    """Seconds the whole run may spend re-timing contended rows (waits included)."""

    seconds: float

    def spend(self, seconds: float) -> None:
        self.seconds -= seconds


def _wait_for_idle_cpu(max_seconds: float) -> None:
    """Return once other processes use at most BUSY_CORES over one second, or after ``max_seconds``."""
    deadline = time.perf_counter() + max_seconds
    while time.perf_counter() < deadline:
        with other_processes_cpu() as others:
            time.sleep(1)
        if others.cores is None or others.cores <= BUSY_CORES:
            return


def time_row(block_dir: Path, block: torch.nn.Module, x: np.ndarray, labels: np.ndarray, *, threads: int,
             args: argparse.Namespace, repeats: int, budget: RetryBudget, label: str,
             progress: tqdm) -> tuple[Timing, Timing, Timing, int]:
    """Time ORT, the portable graph and torch in rounds; while other processes compete, wait for an idle CPU and
    time all three again.

    Returns the least contended (ORT, portable, torch) triple and how many attempts were timed.
    """
    best: tuple[float, Timing, Timing, Timing] | None = None
    attempts = 0
    while True:
        retrying = attempts > 0
        started = time.perf_counter()
        if retrying:
            progress.set_postfix_str(f"{label}: waiting for an idle CPU")
            _wait_for_idle_cpu(min(IDLE_WAIT_S, budget.seconds))
        suffix = f" retry {attempts}" if retrying else ""
        progress.set_postfix_str(f"{label}{suffix}")
        timed = time_runtimes(block_dir, block, x, labels, threads=threads, lr=args.lr, warmup=args.warmup,
                              repeats=repeats)
        ort, portable, eager = timed["ort"], timed["portable"], timed["torch"]
        attempts += 1
        if retrying:
            budget.spend(time.perf_counter() - started)
        contention = max(ort.others_cores or 0.0, portable.others_cores or 0.0, eager.others_cores or 0.0)
        if best is None or contention < best[0]:
            best = (contention, ort, portable, eager)
        if contention <= BUSY_CORES or attempts > args.retries or budget.seconds <= 0:
            return best[1], best[2], best[3], attempts


def benchmark_model(name: str, args: argparse.Namespace, repeats: int, workdir: Path, budget: RetryBudget,
                    progress: tqdm) -> list[Row]:
    """Export ``name``, rebuild its torch blocks with the same seed, and time every block at every thread count."""
    progress.set_postfix_str(f"exporting {name}")
    run_dir = export_model(name, out=workdir / name, method=METHOD, blocks=args.blocks,
                           batch_size=args.batch_size, seed=args.seed, lr=args.lr, progress=False)
    torch.manual_seed(args.seed)  # export_model seeds the same way: these blocks hold the exported weights
    spec = build_model(name)
    blocks, input_shapes, groups = build_blocks(spec, METHOD, args.blocks)
    rng = np.random.default_rng(args.seed)
    rows = []
    for k, (block, input_shape, group) in enumerate(zip(blocks, input_shapes, groups)):
        x = rng.standard_normal((args.batch_size, *input_shape), dtype=np.float32)
        labels = rng.integers(0, spec.num_classes, size=args.batch_size, dtype=np.int64)
        peaks = {}
        baseline = measure_baseline() if args.memory else None
        for backend in ("ort-training", "portable") if args.memory else ():
            progress.set_postfix_str(f"{name} block {k}: peak memory, {backend}")
            measured = measure_block(run_dir / block_dir_name(k), baseline, steps=4,
                                     threads=1, backend=backend)
            peaks[backend] = round(measured.peak_rss_bytes / 2**20, 1)
        for threads in args.threads:
            ort, portable, eager, attempts = time_row(run_dir / block_dir_name(k), block, x, labels, threads=threads, args=args,
                                            repeats=repeats, budget=budget,
                                            label=f"{name} block {k} threads {threads}", progress=progress)
            progress.update()
            rows.append(Row(
                model=name, block=k, units=[spec.unit_names[u] for u in group],
                params=sum(p.numel() for p in block.parameters()), input_shape=list(input_shape), threads=threads,
                batch_size=args.batch_size, repeats=repeats, attempts=attempts,
                ort_ms=_milliseconds(ort.median_s), ort_iqr_ms=_milliseconds(ort.iqr_s),
                torch_ms=_milliseconds(eager.median_s), torch_iqr_ms=_milliseconds(eager.iqr_s),
                portable_ms=_milliseconds(portable.median_s), portable_iqr_ms=_milliseconds(portable.iqr_s),
                ort_over_torch=round_ratio(ort, eager), portable_over_torch=round_ratio(portable, eager),
                portable_over_ort=round_ratio(portable, ort),
                ort_cpu_ms=_milliseconds(ort.cpu_median_s), torch_cpu_ms=_milliseconds(eager.cpu_median_s),
                portable_cpu_ms=_milliseconds(portable.cpu_median_s),
                ort_others_cores=ort.others_cores, torch_others_cores=eager.others_cores,
                portable_others_cores=portable.others_cores,
                ort_steps_ms=[_milliseconds(t) for t in ort.steps_s],
                torch_steps_ms=[_milliseconds(t) for t in eager.steps_s],
                portable_steps_ms=[_milliseconds(t) for t in portable.steps_s],
                ort_peak_rss_mib=peaks.get("ort-training"), portable_peak_rss_mib=peaks.get("portable"),
            ))
    return rows


def _contended(row: Row) -> bool:
    return any(c is not None and c > BUSY_CORES
               for c in (row.ort_others_cores, row.portable_others_cores, row.torch_others_cores))


def render_markdown(rows: list[Row], machine: dict, settings: dict) -> str:
    """The results table, headed by the command and the machine that produced it."""
    table = markdown_table(
        ["model", "block", "params", "input shape", "threads", "ORT-training ms", "portable ms", "torch ms",
         "ORT/torch", "portable/torch", "portable/ORT"],
        [[r.model, r.block, f"{r.params:,}", "×".join(map(str, r.input_shape)), r.threads,
          f"{r.ort_ms:.1f} ± {r.ort_iqr_ms:.1f}", f"{r.portable_ms:.1f} ± {r.portable_iqr_ms:.1f}",
          f"{r.torch_ms:.1f} ± {r.torch_iqr_ms:.1f}", f"{r.ort_over_torch:.2f}", f"{r.portable_over_torch:.2f}",
          f"{r.portable_over_ort:.2f}" + (" †" if _contended(r) else "")]
         for r in rows],
        align="lrrlrrrrrrr",
    )
    measured = [r for r in rows if r.ort_peak_rss_mib is not None and r.threads == rows[0].threads]
    memory = ("\n\nPeak resident memory of a process that trains one block (4 steps, one thread; interpreter, "
              "numpy and onnxruntime included; `edgebll.profiler.measure_block`):\n\n" + markdown_table(
                  ["model", "block", "ORT-training MiB", "portable MiB", "portable/ORT"],
                  [[r.model, r.block, f"{r.ort_peak_rss_mib:.0f}", f"{r.portable_peak_rss_mib:.0f}",
                    f"{r.portable_peak_rss_mib / r.ort_peak_rss_mib:.2f}"] for r in measured],
                  align="lrrrr") + "\n") if measured else ""
    repeats = ", ".join(f"{model} {n}" for model, n in settings["repeats"].items())
    during = settings["other_processes_cores"]["during"]
    contended = sum(map(_contended, rows))
    note = (f"\n† {contended} of {len(rows)} rows: other processes kept more than {BUSY_CORES} cores busy while they "
            f"were timed, even after up to {settings['retries']} retries (`*_others_cores` in the JSON); treat them "
            "with care.\n" if contended else "")
    return (
        "# Training step time per block: onnxruntime-training, the portable graph, torch eager\n\n"
        f"`{machine['command']}` on {describe_machine(machine)}.\n\n"
        f"One training step (forward, local loss, backward, AdamW) of each block of a {settings['blocks']}-block "
        f"`{settings['method']}` split, batch {settings['batch_size']}; median ± inter-quartile range of the timed "
        f"steps ({repeats}) after {settings['warmup']} warm-up steps, the three runtimes taking turns step by step; "
        "each ratio is the median over those rounds of the two steps' ratio in one round. ORT-training: onnxruntime-training's "
        "training API; portable: the block's whole step as one standard-op graph on onnxruntime's inference session "
        "(what a board runs). A ratio < 1: the first runtime is faster. "
        f"Other processes kept {'an unknown number of' if during is None else f'{during:.2f}'} cores busy on "
        f"average during the run ({settings['total_seconds']:.0f} s).\n\n"
        + table + note + memory
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Median wall time of one training step per block, onnxruntime-training (BlockRunner), the "
                    "portable graph (PortableRunner) and torch eager, at the same batch size and thread count. Writes benchmarks/results/<name>.json "
                    "and <name>.md.",
    )
    default = " (default: %(default)s)"
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn-small", "resnet18"],
                        help="zoo models to export and time" + default)
    parser.add_argument("--blocks", type=int, default=4, help="number of blocks each model is split into" + default)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per training step, both runtimes" + default)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to time: torch.set_num_threads(n) and the runners' threads=n" + default)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones" + default)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per measurement, for every model (default: "
                             + ", ".join(f"{m} {n}" for m, n in DEFAULT_REPEATS.items())
                             + f", other models {FALLBACK_REPEATS})")
    parser.add_argument("--retries", type=int, default=2,
                        help=f"times to re-time a row while other processes keep more than {BUSY_CORES} cores busy, "
                             f"after waiting up to {IDLE_WAIT_S:.0f} s for an idle CPU; the least contended attempt "
                             "is kept, and rows that stay contended are marked" + default)
    parser.add_argument("--retry-budget", type=float, default=180.0, metavar="SECONDS",
                        help="total seconds the run may spend on retries (waits included), to bound its time" + default)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each block's peak resident memory on both ONNX Runtime backends, each "
                             "in a fresh process" + default)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, both runtimes" + default)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random batches" + default)
    parser.add_argument("--name", default="step_speed",
                        help="results file stem: writes benchmarks/results/<name>.json and <name>.md" + default)
    args = parser.parse_args(argv)
    for option, least in (("blocks", 1), ("warmup", 0), ("repeats", 1), ("retries", 0)):
        value = getattr(args, option)
        if value is not None and value < least:
            parser.error(f"--{option} must be at least {least}, got {value}")
    if args.retry_budget < 0:
        parser.error(f"--retry-budget must be at least 0, got {args.retry_budget}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (BatchNorm needs a batch), got {args.batch_size}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be positive, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = {m: args.repeats or DEFAULT_REPEATS.get(m, FALLBACK_REPEATS) for m in args.models}
    machine = machine_info()
    with other_processes_cpu() as before:
        time.sleep(1)
    if before.cores and before.cores > BUSY_CORES:
        print(f"warning: other processes keep {before.cores:.1f} cores busy: these timings will be noisy (the "
              "contended rows are marked); rerun on an idle machine", file=sys.stderr)
    started = time.perf_counter()
    total_rows = args.blocks * len(args.threads) * len(args.models)
    budget = RetryBudget(args.retry_budget)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgebll-step-speed-") as tmp, other_processes_cpu() as during, \
            tqdm(total=total_rows, desc="step speed", unit="row") as progress:
        for name in args.models:
            rows += benchmark_model(name, args, repeats[name], Path(tmp), budget, progress)
    settings = {"method": METHOD, "blocks": args.blocks, "batch_size": args.batch_size, "threads": args.threads,
                "warmup": args.warmup, "repeats": repeats, "retries": args.retries,
                "retry_budget_s": args.retry_budget, "lr": args.lr, "seed": args.seed,
                "total_seconds": round(time.perf_counter() - started, 1),
                "other_processes_cores": {"before": before.cores, "during": during.cores},
                "contended_above_cores": BUSY_CORES}
    data = {"benchmark": "step_speed", "machine": machine, "settings": settings, "rows": [asdict(r) for r in rows]}
    json_path, md_path = write_results(args.name, data, render_markdown(rows, machine, settings))
    print(f"wrote {json_path} and {md_path} in {settings['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
