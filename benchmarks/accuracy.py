"""Test accuracy of bp, bwbpf and bll on Fashion-MNIST under one recipe (model, data, optimizer, epochs, batch).

Each method is exported with the same seed and trained by the edgebll runtime (ONNX Runtime, in
process, messages through the codec), then evaluated on the test set. Writes
benchmarks/results/accuracy.{json,md}.

    python benchmarks/accuracy.py --model cnn-small --blocks 4 --epochs 1 --codec int8
    python benchmarks/accuracy.py --limit 8192 --test-limit 2000      # a quick look
    python benchmarks/accuracy.py --seeds 0 1 2 --jobs 2 --threads 1  # two runs at a time on two cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, keep_path, markdown_table, publish, run_all  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.export import export_model  # noqa: E402

METHODS = ("bp", "bwbpf", "bll")


def run_one(job: tuple[str, int], args: argparse.Namespace, workdir: Path) -> dict:
    """Export, train and evaluate one (method, seed); returns the row for the table."""
    method, seed = job
    out = export_model(args.model, out=workdir / f"{method}-{seed}", method=method,
                       blocks=1 if method == "bp" else args.blocks, batch_size=args.batch_size, lr=args.lr,
                       seed=seed, progress=False)
    runtime = Runtime.from_run(out, threads=args.threads)
    bll = dict(mix_start=args.mix_start, mix_end=args.mix_end, feedback_lr_scale=args.feedback_lr_scale)
    train = runtime.train(epochs=args.epochs, codec=args.codec, limit=args.limit, seed=seed, val_split=args.val_split,
                          progress=False, **(bll if method == "bll" else {}))
    evaluation = runtime.evaluate(limit=args.test_limit, batch_size=args.eval_batch_size, progress=False)
    return {"method": method, "seed": seed, "test_accuracy": evaluation["test_accuracy"],
            "per_block_accuracy": evaluation["per_block_accuracy"], "samples_per_s": train["samples_per_s"],
            "message_bytes_per_step": sum(train["message_bytes_per_step"]) + sum(train["feedback_bytes_per_step"]),
            "validation_accuracy": train["epochs"][-1].get("validation_accuracy"),
            "train_seconds": train["seconds"]}


def render(rows: list[dict], args: argparse.Namespace, machine: dict) -> str:
    table = []
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        accs = [100 * r["test_accuracy"] for r in mine]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        table.append([method, 1 if method == "bp" else args.blocks, f"{statistics.mean(accs):.2f}{spread}",
                      " / ".join(f"{100 * a:.1f}" for a in mine[0]["per_block_accuracy"]),
                      f"{statistics.mean(r['samples_per_s'] for r in mine):.0f}",
                      f"{statistics.mean(r['message_bytes_per_step'] for r in mine):,.0f}", len(mine)])
        if args.val_split:
            table[-1].insert(3, f"{statistics.mean(100 * r['validation_accuracy'][-1] for r in mine):.2f}")
    data = f"{args.limit or 60000 - args.val_split} training images, {args.test_limit or 10000} test images"
    if args.val_split:
        data += f", validation on the last {args.val_split} training images"
    if "bll" in args.methods:
        data += f"; bll: mix {args.mix_start} to {args.mix_end}, feedback lr x{args.feedback_lr_scale:g}"
    columns = ["method", "blocks", "test acc. %", "per-block acc. % (first seed)", "samples/s", "message bytes/step",
               "seeds"]
    if args.val_split:
        columns.insert(3, "val. acc. %")
    return (f"# Accuracy: bp vs bwbpf vs bll\n\n{args.model}, {args.epochs} epoch(s), batch {args.batch_size}, AdamW "
            f"lr {args.lr} cosine, {args.codec} messages, {data}; machine: {describe_machine(machine)}.\n"
            f"Command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`\n\n"
            + markdown_table(columns, table, "lrr" + ("r" if args.val_split else "") + "lrrr"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn-small", help="zoo model (default: cnn-small)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks K for bwbpf and bll (default: 4)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per method (default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    parser.add_argument("--codec", default="int8", help="message codec (default: int8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--threads", type=int, default=0, help="ORT threads per block (default: ORT decides)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="test images per eval step (default: the training batch; results before 2026-12-01 "
                             "used 500, which changes int8 per-tensor scales a little)")
    parser.add_argument("--name", default="accuracy", help="results file name (default: accuracy)")
    parser.add_argument("--val-split", type=int, default=0,
                        help="hold out the last N training images and report each block's accuracy on them (for "
                             "choosing settings; default: 0)")
    parser.add_argument("--mix-start", type=float, default=2.0, help="bll: mixing weight m at the first step (default: 2)")
    parser.add_argument("--mix-end", type=float, default=0.5, help="bll: m at the last step (default: 0.5)")
    parser.add_argument("--feedback-lr-scale", type=float, default=10.0,
                        help="bll: feedback blocks' learning-rate multiple (default: 10)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process (default: 1; with N > 1 give --threads "
                             "so that N x threads <= cores, and read samples/s as measured side by side)")
    args = parser.parse_args(argv)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    keep = keep_path(args.name)  # finished runs survive a crash; rerunning the command reuses them
    same = {k: v for k, v in vars(args).items() if k not in ("seeds", "methods", "jobs")}
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(run_one, jobs, args, Path(tmp), jobs=args.jobs, desc="accuracy", keep=keep, settings=same)
    publish(args.name, vars(args), rows, lambda machine: render(rows, args, machine), keep=keep)


if __name__ == "__main__":
    main()
