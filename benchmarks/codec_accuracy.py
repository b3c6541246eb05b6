"""Test accuracy vs message bytes: cnn-small in K=4 blocks (BWBPF, BLL), trained with each message codec.

For every method and codec (and scale granularity of the int codecs) it exports the same model with
the same seed into a fresh temporary folder, trains it for ``--epochs`` epochs on the first ``--limit``
Fashion-MNIST training images with every message between blocks going through that codec, and
evaluates the last block's head on the first ``--test-limit`` test images (the test messages go
through the same codec). Everything but the codec is the same in every row: weights at export,
shuffling order, learning-rate schedule. Reports the test accuracy, its difference to fp32 in
points (against the same method's fp32 row), and the message bytes per training sample (all frames,
headers and scales included, summed over the K-1 links; for BLL the feedback messages sent down
too). Writes benchmarks/results/codec_accuracy.{json,md} (``--name`` changes that).

    python benchmarks/codec_accuracy.py                               # 1 epoch, all 60k / 10k images
    python benchmarks/codec_accuracy.py --epochs 3 --granularities tensor channel
    python benchmarks/codec_accuracy.py --methods bll --codecs int8 --update   # add or redo rows only
    python benchmarks/codec_accuracy.py --limit 1024 --test-limit 500 --name codec_accuracy_smoke

A row takes 6-8 minutes on one core; ``--update`` keeps the rows already in the results file that
this run does not redo (the settings must match), so a table can be filled in row by row.

One run per row, one seed: differences of a few tenths of a point are within seed noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, describe_machine, machine_info, markdown_table, write_results  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.codec import CODECS, GRANULARITIES  # noqa: E402

MODEL, BLOCKS, BATCH_SIZE = "cnn-small", 4, 64
METHODS = ("bwbpf", "bll")
INT_CODECS = ("int8", "int4", "int2")
DEFAULT_CODECS = ["fp32", "fp16", "int8", "int4", "int2"]
# Settings every row of one results file shares; --update refuses to mix rows that differ in them.
SHARED_SETTINGS = ("model", "blocks", "batch_size", "epochs", "limit", "test_limit", "lr", "seed", "threads")


def _row_key(row: dict) -> tuple[str, str, str]:
    return row["method"], row["codec"], row["granularity"]


def run_one(method: str, codec: str, granularity: str, args: argparse.Namespace) -> dict:
    """Export, train and evaluate one row in a temporary run folder."""
    from edgebll.export import export_model

    with tempfile.TemporaryDirectory(prefix=f"codec-accuracy-{method}-{codec}-") as tmp:
        run_dir = export_model(MODEL, out=Path(tmp) / "run", method=method, blocks=BLOCKS, batch_size=BATCH_SIZE,
                               lr=args.lr, seed=args.seed, progress=False)
        runtime = Runtime.from_run(run_dir, threads=args.threads)
        began = time.perf_counter()
        train = runtime.train(epochs=args.epochs, codec=codec, granularity=granularity, limit=args.limit,
                              seed=args.seed, data_dir=args.data_dir, progress=False)
        evaluation = runtime.evaluate(limit=args.test_limit, data_dir=args.data_dir, progress=False)
    return {
        "method": method, "codec": codec, "granularity": granularity,
        "test_accuracy": evaluation["test_accuracy"], "per_block_accuracy": evaluation["per_block_accuracy"],
        "test_loss": evaluation["test_loss"], "test_samples": evaluation["samples"],
        "train_accuracy": train["epochs"][-1]["accuracy"], "train_samples": train["samples"],
        "message_bytes_per_sample": train["message_bytes_per_sample"],
        "message_bytes_per_step": train["message_bytes_per_step"],
        "feedback_bytes_per_step": train.get("feedback_bytes_per_step", []),
        "train_seconds": train["seconds"], "samples_per_s": train["samples_per_s"],
        "seconds": round(time.perf_counter() - began, 1),
        "machine": machine_info(),  # per row: with --update, rows of one table come from several runs
    }


def load_previous(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier results file (for --update), after checking it used the same settings.

    Files written before BLL rows existed hold BWBPF rows only, named by ``settings["method"]``, and
    one machine for every row: both are filled into each row.
    """
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    old = data.get("settings", {})
    differing = [f"{key}: {old.get(key)!r} there, {settings[key]!r} here" for key in SHARED_SETTINGS
                 if key in old and old[key] != settings[key]]
    if differing:
        raise SystemExit(f"--update: {path} was measured with other settings ({'; '.join(differing)}); "
                         f"hint: pass the same options, or drop --update to start a new table")
    rows = data.get("rows", [])
    for row in rows:
        row.setdefault("method", old.get("method", "bwbpf"))
        row.setdefault("feedback_bytes_per_step", [])
        row.setdefault("machine", data.get("machine"))
    return rows


def render(rows: list[dict], settings: dict) -> str:
    reference = {r["method"]: r for r in rows if r["codec"] == "fp32"}
    table = []
    for row in rows:
        scales = row["granularity"] if row["codec"] in INT_CODECS else "—"
        fp32 = reference.get(row["method"])
        delta = f"{(row['test_accuracy'] - fp32['test_accuracy']) * 100:+.2f}" if fp32 else "—"
        ratio = f"{fp32['message_bytes_per_sample'] / row['message_bytes_per_sample']:.1f}x" if fp32 else "—"
        table.append([row["method"], row["codec"], scales, f"{row['test_accuracy']:.4f}", delta,
                      f"{row['message_bytes_per_sample']:,.0f}", ratio, f"{row['samples_per_s']:.0f}"])
    headers = ["method", "codec", "scales", "test accuracy", "vs fp32 (points)", "message bytes / sample",
               "smaller than fp32", "train samples/s"]
    machines = {describe_machine(r["machine"]) for r in rows if r.get("machine")}
    commands = sorted({r["machine"]["command"] for r in rows if r.get("machine") and r["machine"].get("command")})
    methods = " and ".join(dict.fromkeys(r["method"] for r in rows))
    return (f"# Test accuracy vs message codec\n\n"
            f"{MODEL}, {BLOCKS} {methods} blocks, batch {BATCH_SIZE}, {settings['epochs']} epoch(s) on "
            f"{settings['train_samples']:,} training images, tested on {settings['test_samples']:,} images; lr "
            f"{settings['lr']:g}, seed {settings['seed']} for every row (same initial weights and batch order).\n"
            f"Machine: {'; or '.join(sorted(machines))}.\n"
            f"Command{'s' if len(commands) > 1 else ''}: {', '.join(f'`python benchmarks/{c}`' for c in commands)}."
            f"\n\n" + markdown_table(headers, table, "lllrrrrr")
            + "\nvs fp32: against the same method's fp32 row. BLL's bytes include its feedback messages.\n"
            "One run per row: differences of a few tenths of a point are within seed noise. Train samples/s "
            "depends on the load on the machine while each row ran (the rows' machines are in the JSON).\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per codec (default: 1)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="train on the first N training images (default: all 60,000)")
    parser.add_argument("--test-limit", type=int, default=None, metavar="M",
                        help="test on the first M test images (default: all 10,000)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help=f"local-learning methods, rows for each (default: {' '.join(METHODS)})")
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, choices=CODECS,
                        help=f"message codecs, one row each (default: {' '.join(DEFAULT_CODECS)})")
    parser.add_argument("--granularities", nargs="+", default=["tensor"], choices=GRANULARITIES,
                        help="scales of the int codecs, one row each (default: tensor)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3, as edgebll export)")
    parser.add_argument("--seed", type=int, default=0, help="export and shuffling seed of every row (default: 0)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per block (default: ORT decides)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: edgebll's)")
    parser.add_argument("--name", default="codec_accuracy", help="results file name (default: codec_accuracy)")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of the existing results file that this run does not redo")
    args = parser.parse_args(argv)

    settings = {"model": MODEL, "blocks": BLOCKS, "batch_size": BATCH_SIZE, "epochs": args.epochs,
                "limit": args.limit, "test_limit": args.test_limit, "lr": args.lr, "seed": args.seed,
                "threads": args.threads}
    previous = load_previous(RESULTS_DIR / f"{args.name}.json", settings) if args.update else []
    jobs = [(method, codec, granularity) for method in args.methods for codec in args.codecs
            for granularity in (args.granularities if codec in INT_CODECS else ["tensor"])]
    fresh = []
    for index, (method, codec, granularity) in enumerate(jobs, 1):
        row = run_one(method, codec, granularity, args)
        fresh.append(row)
        print(f"[{index}/{len(jobs)}] {method:>5} {codec:>4} {granularity:<7} test accuracy "
              f"{row['test_accuracy']:.4f} · {row['message_bytes_per_sample']:,.0f} B/sample · "
              f"{row['seconds']:.0f} s", flush=True)
    redone = {_row_key(r) for r in fresh}
    order = {(m, c): i for i, (m, c) in enumerate((m, c) for m in METHODS for c in CODECS)}
    rows = sorted([r for r in previous if _row_key(r) not in redone] + fresh,
                  key=lambda r: (order.get((r["method"], r["codec"]), len(order)), r["granularity"]))
    settings |= {"methods": sorted({r["method"] for r in rows}, key=METHODS.index),
                 "train_samples": rows[0]["train_samples"] // args.epochs if rows else 0,
                 "test_samples": rows[0]["test_samples"] if rows else 0}
    json_path, md_path = write_results(args.name, {"machine": machine_info(), "settings": settings, "rows": rows},
                                       render(rows, settings))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
