"""Pipeline scaling: samples/s of K blocks on K MPI ranks (one per core) vs one process and vs backprop.

For each K: the model is exported in K blocks; each block's step time is measured alone (one
thread); then the same steps are trained (a) in one process, block after block, one thread,
(b) on K MPI ranks pinned one per core (``edgebll train --transport mpi``), and whole-model
backprop in ORT with K threads on the same cores. Pipeline efficiency = MPI throughput / the
throughput of the slowest block alone (the most a pipeline can deliver). Bytes on the wire per
sample are given per codec (exact frame sizes; the int8 row is also what the MPI run counted).

    python benchmarks/pipeline_scaling.py                         # K = 1, 2, 4, 8 up to the cores there are
    python benchmarks/pipeline_scaling.py --ranks 2 --steps 30    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, markdown_table, other_processes_cpu, publish  # noqa: E402

from edgebll import BlockRunner, Runtime  # noqa: E402
from edgebll.codec import frame_nbytes  # noqa: E402
from edgebll.idx import resolve_data_dir  # noqa: E402
from edgebll.export import export_model  # noqa: E402

CODECS = ("fp32", "fp16", "int8", "int4")


def block_alone_ms(block_dir: Path, batch: int, steps: int) -> float:
    """Median ms of one train step of one block, alone, one thread, on random inputs of its shapes."""
    runner = BlockRunner(block_dir, threads=1, load_trained=False)
    x_spec, side_spec = runner.manifest.inputs
    rng = np.random.default_rng(0)
    x = rng.standard_normal([batch, *x_spec.per_sample_shape()]).astype(np.float32)
    side = (rng.integers(0, 10, batch) if side_spec.dtype == "int64"
            else rng.standard_normal([batch, *side_spec.per_sample_shape()]).astype(np.float32))
    times = []
    for i in range(steps + 3):
        began = time.perf_counter()
        runner.train_step(x, side, 1e-3)
        if i >= 3:  # ORT plans memory on the first steps
            times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


def wire_bytes_per_sample(run: Path, blocks: int, codec: str) -> float:
    """Activation frames a sample sends over all links (forward messages; exact frame sizes)."""
    total = 0
    for k in range(blocks - 1):
        spec = BlockRunner(run / f"block-{k}", verify_files=False, load_trained=False).manifest.output("message")
        total += frame_nbytes([1, *spec.per_sample_shape()], codec)  # batch-1 frame: header counted per sample
    return float(total)


def measure(k: int, args: argparse.Namespace, workdir: Path) -> dict:
    limit = args.steps * args.batch_size
    run = export_model(args.model, out=workdir / f"k{k}", method="bp" if k == 1 else args.method, blocks=k,
                       batch_size=args.batch_size, progress=False)
    alone = [block_alone_ms(run / f"block-{b}", args.batch_size, args.alone_steps) for b in range(k)]
    row: dict = {"ranks": k, "blocks": k, "block_alone_ms": [round(a, 2) for a in alone]}

    with other_processes_cpu() as busy:
        sequential = Runtime.from_run(run, threads=1).train(limit=limit, epochs=1, progress=False)
    row["sequential_samples_per_s"], row["sequential_busy_cores"] = sequential["samples_per_s"], busy.cores

    command = [sys.executable, "-m", "edgebll", "train", str(run), "--transport", "mpi", "-n", str(k), "--threads",
               "1", "--limit", str(limit), "--no-progress", "--restart", "--data-dir", str(resolve_data_dir(None))]
    with other_processes_cpu() as busy:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"MPI run with {k} ranks failed:\n{done.stdout}\n{done.stderr}")
    mpi = json.loads((run / "train.json").read_text())
    row["mpi_samples_per_s"], row["mpi_busy_cores"] = mpi["samples_per_s"], busy.cores
    row["mpi_message_bytes_per_sample"] = mpi["message_bytes_per_sample"]

    bp = run if k == 1 else export_model(args.model, out=workdir / f"bp{k}", method="bp", blocks=1,
                                         batch_size=args.batch_size, progress=False)
    with other_processes_cpu() as busy:
        row["bp_samples_per_s"] = Runtime.from_run(bp, threads=k, load_trained=False).train(
            limit=limit, epochs=1, progress=False, resume=False)["samples_per_s"] if k > 1 else \
            row["sequential_samples_per_s"]
    row["bp_busy_cores"] = busy.cores
    ideal = args.batch_size * 1000 / max(alone)
    row["ideal_samples_per_s"] = round(ideal, 2)
    row["pipeline_efficiency"] = round(row["mpi_samples_per_s"] / ideal, 3)
    row["speedup_vs_sequential"] = round(row["mpi_samples_per_s"] / row["sequential_samples_per_s"], 3)
    row["wire_bytes_per_sample"] = {c: wire_bytes_per_sample(run, k, c) for c in CODECS}
    return row


def render(rows: list[dict], args: argparse.Namespace, machine: dict) -> str:
    table = [[r["ranks"], " / ".join(f"{a:.0f}" for a in r["block_alone_ms"]), f"{r['sequential_samples_per_s']:.0f}",
              f"{r['mpi_samples_per_s']:.0f}", f"{r['bp_samples_per_s']:.0f}", f"{r['speedup_vs_sequential']:.2f}×",
              f"{100 * r['pipeline_efficiency']:.0f} %",
              " / ".join(f"{r['wire_bytes_per_sample'][c]:,.0f}" for c in CODECS),
              f"{r['mpi_busy_cores']}"] for r in rows]
    return (f"# Pipeline scaling: one block per MPI rank\n\n{args.model} ({args.method}), batch {args.batch_size}, "
            f"{args.steps} steps per measurement, Fashion-MNIST; ranks pinned one per core (mpiexec -bind-to core), "
            f"1 ORT thread per block; bp uses as many threads as there are ranks. Machine: "
            f"{describe_machine(machine)}.\nCommand: `python benchmarks/pipeline_scaling.py {' '.join(sys.argv[1:])}`"
            "\n\nEfficiency = MPI samples/s ÷ (batch ÷ slowest block's step time alone). 'other cores busy' is CPU "
            "used by other processes during the MPI run (0 on a quiet machine).\n\n"
            + markdown_table(["ranks = blocks", "block step alone (ms)", "1 process samples/s", "MPI samples/s",
                              "bp samples/s", "MPI vs 1 process", "pipeline efficiency",
                              "wire bytes/sample fp32 / fp16 / int8 / int4", "other cores busy"], table,
                             "rlrrrrrrr"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--model", default="cnn-small", help="zoo model (default: cnn-small)")
    parser.add_argument("--method", default="bwbpf", choices=("bwbpf", "bll"), help="(default: bwbpf)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[k for k in (1, 2, 4, 8) if k <= cores],
                        help=f"rank counts (default: 1, 2, 4, 8 up to the {cores} usable cores)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per measurement (default: 60)")
    parser.add_argument("--alone-steps", type=int, default=15, help="steps timed per block alone (default: 15)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--name", default="pipeline_scaling", help="results file name (default: pipeline_scaling)")
    args = parser.parse_args(argv)
    if max(args.ranks) > cores:
        print(f"note: {max(args.ranks)} ranks on {cores} cores share cores: the figures do not show scaling",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(k, args, Path(tmp)) for k in args.ranks]
    publish(args.name, vars(args), rows, lambda machine: render(rows, args, machine))


if __name__ == "__main__":
    main()
