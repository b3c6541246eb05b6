"""Peak memory of evaluation against training, per block: does a block that trains on a board also evaluate there?

Every block of each model (bwbpf, K blocks, exported at the training batch) is measured three times
in its own fresh process, as ``edgebll profile`` measures (peak resident memory above an idle
interpreter with ORT imported): a few training steps at the training batch; the eval graph at the
training batch (what ``edgebll eval`` and ``--val-split`` run); and the eval graph at ``--large``
images per step (500: what edgebll's evaluation used before it took the training batch).

    python benchmarks/eval_memory.py                       # resnet18 and cnn-small, K=4 (~3 minutes)
    python benchmarks/eval_memory.py --models resnet18 --large 256

Writes benchmarks/results/eval_memory.json and .md. Needs torch (it exports the models).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, markdown_table, publish  # noqa: E402

from edgebll.export import export_model  # noqa: E402
from edgebll.manifest import load_block_manifest  # noqa: E402
from edgebll.profiler import Baseline, measure_baseline, measure_block  # noqa: E402
from edgebll.run_folder import block_dir_name  # noqa: E402

MIB = 2**20


def measure_model(model: str, blocks: int, batch: int, large: int, baseline: Baseline, workdir: Path, *,
                  steps: int, threads: int) -> list[dict[str, Any]]:
    run = export_model(model, out=workdir / model, method="bwbpf", blocks=blocks, batch_size=batch, progress=False)
    rows = []
    for k in range(blocks):
        folder = run / block_dir_name(k)
        common = dict(steps=steps, threads=threads)
        train = measure_block(folder, baseline, **common)
        evaluated = measure_block(folder, baseline, mode="eval", **common)
        big = measure_block(folder, baseline, mode="eval", batch_size=large, **common)
        rows.append({"model": model, "block": k, "units": load_block_manifest(folder, verify_files=False).units,
                     "train_bytes": train.measured_peak_bytes, "eval_bytes": evaluated.measured_peak_bytes,
                     "eval_large_bytes": big.measured_peak_bytes, "train_step_ms": train.step_ms,
                     "eval_step_ms": evaluated.step_ms})
        print(f"{model} block {k}: train {train.measured_peak_bytes / MIB:.1f} MiB, eval {evaluated.measured_peak_bytes / MIB:.1f} "
              f"MiB, eval at {large}: {big.measured_peak_bytes / MIB:.1f} MiB", file=sys.stderr)
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    def mib(n: int) -> str:
        return f"{n / MIB:.1f} MiB"

    def units(names: list[str]) -> str:
        return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"

    table = [[r["model"], r["block"], units(r["units"]), mib(r["train_bytes"]), mib(r["eval_bytes"]),
              f"{r['eval_bytes'] / r['train_bytes']:.2f}×", mib(r["eval_large_bytes"]),
              f"{r['eval_large_bytes'] / r['train_bytes']:.2f}×"] for r in rows]
    return (f"# Evaluation vs training memory per block\n\n"
            f"bwbpf, K={args.blocks}, exported at batch {args.batch_size}; peak resident memory above the idle runtime, "
            f"each figure from its own process ({args.steps} steps, {args.threads} ORT thread(s)); machine: "
            f"{describe_machine(machine)}.\n"
            f"Command: `python benchmarks/eval_memory.py {' '.join(sys.argv[1:])}`\n\n"
            + markdown_table(["model", "block", "units", f"train, batch {args.batch_size}",
                              f"eval, batch {args.batch_size}", "eval / train", f"eval, batch {args.large}",
                              f"eval {args.large} / train"], rows=table, align="lrlrrrrr"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "cnn-small"], help="(default: resnet18 cnn-small)")
    parser.add_argument("--blocks", type=int, default=4, help="(default: 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default: 64)")
    parser.add_argument("--large", type=int, default=500, help="the large eval batch (default: 500)")
    parser.add_argument("--steps", type=int, default=3, help="steps per measurement (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads (default: 1)")
    parser.add_argument("--name", default="eval_memory", help="results file name (default: eval_memory)")
    args = parser.parse_args(argv)
    baseline = measure_baseline()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for model in args.models
                for row in measure_model(model, args.blocks, args.batch_size, args.large, baseline, Path(tmp),
                                         steps=args.steps, threads=args.threads)]
    publish(args.name, vars(args), rows, lambda machine: render(rows, args, machine))


if __name__ == "__main__":
    main()
