"""Test accuracy vs message bytes: cnn-small in K=4 BWBPF blocks, trained with each message codec.

For every codec (and scale granularity of the int codecs) it exports the same model with the same
seed into a fresh temporary folder, trains it for ``--epochs`` epochs on the first ``--limit``
Fashion-MNIST training images with every message between blocks going through that codec, and
evaluates the last block's head on the first ``--test-limit`` test images (the test messages go
through the same codec). Everything but the codec is the same in every row: weights at export,
shuffling order, learning-rate schedule. Reports the test accuracy, its difference to fp32 in
points, and the message bytes per training sample (all frames, headers and scales included, summed
over the K-1 links). Writes benchmarks/results/codec_accuracy.{json,md} (``--name`` changes that).

    python benchmarks/codec_accuracy.py                               # 1 epoch, all 60k / 10k images
    python benchmarks/codec_accuracy.py --epochs 3 --granularities tensor channel
    python benchmarks/codec_accuracy.py --limit 1024 --test-limit 500 --name codec_accuracy_smoke

One run per row, one seed: differences of a few tenths of a point are within seed noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table, write_results  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.codec import CODECS, GRANULARITIES  # noqa: E402

MODEL, METHOD, BLOCKS, BATCH_SIZE = "cnn-small", "bwbpf", 4, 64
INT_CODECS = ("int8", "int4", "int2")
DEFAULT_CODECS = ["fp32", "fp16", "int8", "int4", "int2"]


def run_one(codec: str, granularity: str, args: argparse.Namespace) -> dict:
    """Export, train and evaluate one row in a temporary run folder."""
    from edgebll.export import export_model

    with tempfile.TemporaryDirectory(prefix=f"codec-accuracy-{codec}-") as tmp:
        run_dir = export_model(MODEL, out=Path(tmp) / "run", method=METHOD, blocks=BLOCKS, batch_size=BATCH_SIZE,
                               lr=args.lr, seed=args.seed, progress=False)
        runtime = Runtime.from_run(run_dir, threads=args.threads)
        began = time.perf_counter()
        train = runtime.train(epochs=args.epochs, codec=codec, granularity=granularity, limit=args.limit,
                              seed=args.seed, data_dir=args.data_dir, progress=False)
        evaluation = runtime.evaluate(limit=args.test_limit, data_dir=args.data_dir, progress=False)
    return {
        "codec": codec, "granularity": granularity,
        "test_accuracy": evaluation["test_accuracy"], "per_block_accuracy": evaluation["per_block_accuracy"],
        "test_loss": evaluation["test_loss"], "test_samples": evaluation["samples"],
        "train_accuracy": train["epochs"][-1]["accuracy"], "train_samples": train["samples"],
        "message_bytes_per_sample": train["message_bytes_per_sample"],
        "message_bytes_per_step": train["message_bytes_per_step"],
        "train_seconds": train["seconds"], "samples_per_s": train["samples_per_s"],
        "seconds": round(time.perf_counter() - began, 1),
    }


def render(rows: list[dict], settings: dict, machine: dict) -> str:
    reference = next((r for r in rows if r["codec"] == "fp32"), None)
    table = []
    for row in rows:
        scales = row["granularity"] if row["codec"] in INT_CODECS else "—"
        delta = f"{(row['test_accuracy'] - reference['test_accuracy']) * 100:+.2f}" if reference else "—"
        ratio = f"{reference['message_bytes_per_sample'] / row['message_bytes_per_sample']:.1f}x" if reference else "—"
        table.append([row["codec"], scales, f"{row['test_accuracy']:.4f}", delta,
                      f"{row['message_bytes_per_sample']:,.0f}", ratio, f"{row['samples_per_s']:.0f}"])
    headers = ["codec", "scales", "test accuracy", "vs fp32 (points)", "message bytes / sample", "smaller than fp32",
               "train samples/s"]
    return (f"# Test accuracy vs message codec\n\n"
            f"{MODEL}, {BLOCKS} {METHOD} blocks, batch {BATCH_SIZE}, {settings['epochs']} epoch(s) on "
            f"{settings['train_samples']:,} training images, tested on {settings['test_samples']:,} images; lr "
            f"{settings['lr']:g}, seed {settings['seed']} for every row (same initial weights and batch order).\n"
            f"Machine: {describe_machine(machine)}.\nCommand: `python benchmarks/{Path(__file__).name} "
            f"{' '.join(sys.argv[1:])}`.\n\n"
            + markdown_table(headers, table, "llrrrrr")
            + "\nOne run per row: differences of a few tenths of a point are within seed noise.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per codec (default: 1)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="train on the first N training images (default: all 60,000)")
    parser.add_argument("--test-limit", type=int, default=None, metavar="M",
                        help="test on the first M test images (default: all 10,000)")
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, choices=CODECS,
                        help=f"message codecs, one row each (default: {' '.join(DEFAULT_CODECS)})")
    parser.add_argument("--granularities", nargs="+", default=["tensor"], choices=GRANULARITIES,
                        help="scales of the int codecs, one row each (default: tensor)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3, as edgebll export)")
    parser.add_argument("--seed", type=int, default=0, help="export and shuffling seed of every row (default: 0)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per block (default: ORT decides)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: edgebll's)")
    parser.add_argument("--name", default="codec_accuracy", help="results file name (default: codec_accuracy)")
    args = parser.parse_args(argv)

    jobs = [(codec, granularity) for codec in args.codecs
            for granularity in (args.granularities if codec in INT_CODECS else ["tensor"])]
    rows = []
    for index, (codec, granularity) in enumerate(jobs, 1):
        row = run_one(codec, granularity, args)
        rows.append(row)
        print(f"[{index}/{len(jobs)}] {codec:>4} {granularity:<7} test accuracy {row['test_accuracy']:.4f} · "
              f"{row['message_bytes_per_sample']:,.0f} B/sample · {row['seconds']:.0f} s", flush=True)
    settings = {"model": MODEL, "method": METHOD, "blocks": BLOCKS, "batch_size": BATCH_SIZE, "epochs": args.epochs,
                "limit": args.limit, "test_limit": args.test_limit, "lr": args.lr, "seed": args.seed,
                "threads": args.threads, "train_samples": rows[0]["train_samples"] // args.epochs if rows else 0,
                "test_samples": rows[0]["test_samples"] if rows else 0}
    machine = machine_info()
    json_path, md_path = write_results(args.name, {"machine": machine, "settings": settings, "rows": rows},
                                       render(rows, settings, machine))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
