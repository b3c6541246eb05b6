"""Pred-Sim vs bp, bwbpf (conv and mlp heads) and bll on vgg8b (or cnn-small), one recipe, a sweep over K.

Every method gets the same model initialisation (seeded), optimizer (AdamW), learning rate,
cosine schedule, epochs, batch size and augmentation. The local methods send int8 messages.
Model choices are made on a validation split (the last ``--val-split`` training images); the test
accuracy is that of the final epoch. Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/predsim_accuracy.py                                   # vgg8b, K = 2 4 7, 1 epoch, all data
    python benchmarks/predsim_accuracy.py --width 32 --limit 4096 --threads 1  # a CPU-sized look
    python benchmarks/predsim_accuracy.py --backend torch --device cuda --epochs 100 --cutout 14   # on a GPU
    python benchmarks/predsim_accuracy.py --backend torch --device cuda --precision bf16 ...        # faster there

``--backend ort`` (default) trains through the edgebll runtime (ONNX Runtime artifacts, in
process, messages through the codec); ``--backend torch`` trains the same blocks in torch
(``edgebll.export.reference``: fp32 messages, detached between blocks, BLL with its feedback
chain, on ``--device``), for the long runs a CPU cannot do, and records the test accuracy after
every epoch (a curve; the table still reports the final epoch). ``--model resnet18`` runs the BLL
paper's comparison:

    python benchmarks/predsim_accuracy.py --model resnet18 --methods bp bwbpf-conv bll --blocks 4 \
        --backend torch --device cuda --epochs 30 --name accuracy_resnet18_gpu
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, keep_path, markdown_table, publish, run_all  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.data import Dataset, load_fashion_mnist  # noqa: E402
from edgebll.export import OptimizerConfig, build_model, export_model  # noqa: E402
from edgebll.export.exporter import plan_blocks  # noqa: E402
from edgebll.export.models import ModelSpec, vgg8b  # noqa: E402
from edgebll.export.reference import TorchReference  # noqa: E402
from edgebll.validation import training_data  # noqa: E402

VARIANTS: dict[str, tuple[str, str]] = {
    "bp": ("bp", "conv"), "bwbpf-conv": ("bwbpf", "conv"), "bwbpf-mlp": ("bwbpf", "mlp"),
    "predsim": ("predsim", "conv"), "bll": ("bll", "conv"),
}
"""Row name -> (method, head of the blocks below the last)."""

PUBLISHED = [
    ("Nøkland & Eidnes 2019, VGG8b, Fashion-MNIST", "bp 95.47 %, predsim 95.35 % (test error 4.53 / 4.65 %)"),
    ("Nøkland & Eidnes 2019, VGG8b(2x) + cutout", "predsim 95.86 % (4.14 %)"),
    ("Kappel et al. 2023 (BLL), ResNet-18, Fashion-MNIST", "bll 94.2 %, bp 92.7 %"),
]


def make_model(args: argparse.Namespace, seed: int) -> str | ModelSpec:
    """The model, initialised from ``seed`` (so every method starts from the same weights)."""
    torch.manual_seed(seed)
    if args.model == "vgg8b" and args.width != 128:
        return vgg8b(width=args.width)
    return args.model


def run_ort(variant: str, blocks: int, args: argparse.Namespace, seed: int, data: tuple[Dataset, Dataset | None],
            test: Dataset, workdir: Path) -> dict[str, Any]:
    method, head = VARIANTS[variant]
    out = export_model(make_model(args, seed), out=workdir / f"{variant}-k{blocks}-s{seed}", method=method,
                       blocks=blocks, batch_size=args.batch_size, head=head, lr=args.lr, seed=seed, progress=False)
    runtime = Runtime.from_run(out, threads=args.threads)
    train_set, validation = data  # split once for all runs: the runtime gets the training part only
    train = runtime.train(data=train_set, epochs=args.epochs, codec=args.codec, seed=seed, cutout=args.cutout,
                          progress=False)
    valid = runtime.evaluate(data=validation, progress=False)["test_accuracy"] if validation is not None else None
    evaluation = runtime.evaluate(data=test, progress=False)  # given arrays: written to eval.given.json
    return {"test_accuracy": evaluation["test_accuracy"], "per_block_accuracy": evaluation["per_block_accuracy"],
            "validation_accuracy": valid,
            "samples_per_s": train["samples_per_s"], "train_seconds": train["seconds"],
            "message_bytes_per_step": sum(train["message_bytes_per_step"]) + sum(train["feedback_bytes_per_step"])}


def run_torch(variant: str, blocks: int, args: argparse.Namespace, seed: int, data: tuple[Dataset, Dataset | None],
              test: Dataset) -> dict[str, Any]:
    """The same blocks trained in torch (``TorchReference.fit``: the runtime's batches, schedule, cutout and
    BLL mixing, fp32 messages), with the test accuracy after every epoch as a curve."""
    method, head = VARIANTS[variant]
    plans = plan_blocks(build_model(make_model(args, seed)), method, blocks, head=head)
    reference = TorchReference([p.module for p in plans if p.kind == "forward"], OptimizerConfig(), args.device,
                               feedback=[p.module for p in plans if p.kind == "feedback"], precision=args.precision)
    train_set, validation = data
    curve: list[float] = []
    began = time.perf_counter()

    def epoch_end(epoch: int, ref: TorchReference) -> None:
        curve.append(ref.evaluate(test)[-1])
        # printed as it comes, so a run cut short (a device's time limit) still leaves its curve in the log
        tqdm.write(f"{variant} K={blocks} seed {seed} epoch {epoch + 1}/{args.epochs}: test {curve[-1]:.4f} "
                   f"({time.perf_counter() - began:.0f} s)")
        sys.stdout.flush()

    steps = reference.fit(train_set, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                          cutout_size=args.cutout, progress=False, on_epoch_end=epoch_end)
    seconds = time.perf_counter() - began  # includes the per-epoch test passes
    per_block = reference.evaluate(test)
    return {"test_accuracy": per_block[-1], "per_block_accuracy": per_block,
            "validation_accuracy": reference.evaluate(validation)[-1] if validation is not None else None,
            "samples_per_s": round(steps * args.batch_size / max(seconds, 1e-9), 2), "train_seconds": round(seconds, 3),
            "message_bytes_per_step": None, "test_accuracy_per_epoch": curve}


def render(rows: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    def mean(values: list[float]) -> float:
        return statistics.mean(values)

    bp = [100 * r["test_accuracy"] for r in rows if r["variant"] == "bp"]
    table, pivot = [], {}
    for variant in args.methods:
        for k in ([1] if variant == "bp" else args.blocks):
            mine = [r for r in rows if r["variant"] == variant and r["blocks"] == k]
            if not mine:
                continue
            test = mean([100 * r["test_accuracy"] for r in mine])
            vals = [100 * r["validation_accuracy"] for r in mine if r["validation_accuracy"] is not None]
            spread = f" ± {statistics.stdev([100 * r['test_accuracy'] for r in mine]):.2f}" if len(mine) > 1 else ""
            gap = f"{test - mean(bp):+.2f}" if bp and variant != "bp" else "—"
            per_block = " / ".join(f"{100 * a:.1f}" for a in mine[0]["per_block_accuracy"])
            nbytes = mine[0]["message_bytes_per_step"]
            table.append([variant, k, f"{test:.2f}{spread}", f"{mean(vals):.2f}" if vals else "—", gap, per_block,
                          f"{mean([r['samples_per_s'] for r in mine]):.0f}",
                          f"{nbytes:,.0f}" if nbytes is not None else "—", len(mine)])
            pivot.setdefault(variant, {})[k] = f"{test:.2f}"
    ks = sorted({k for cells in pivot.values() for k in cells})
    by_k = [[variant] + [cells.get(k, "") for k in ks] for variant, cells in pivot.items()]
    w = args.width
    model = args.model if args.model != "vgg8b" or w == 128 else \
        f"vgg8b at width {w} (conv {w}-{2 * w}-{2 * w}-{4 * w}-{4 * w}-{4 * w}, fc {8 * w}; the paper's is 128)"
    train_images = args.limit or (60000 - args.val_split)
    backend = ("edgebll runtime (ONNX Runtime, in process), "
               f"{args.codec} messages" if args.backend == "ort" else
               f"torch reference on {args.device}, fp32 messages, {args.precision} compute")
    return (f"# Pred-Sim vs bp, bwbpf, bll: test accuracy by method and K\n\n"
            f"{model}, Fashion-MNIST, {args.epochs} epoch(s) on {train_images:,} training images "
            f"(validation: the last {args.val_split:,} training images), {len(load_test(args.data_dir, args.test_limit)):,} test images "
            f"(final epoch), batch {args.batch_size}, AdamW lr {args.lr} cosine, cutout {args.cutout or 'off'}, "
            f"seeds {args.seeds}; {backend}; {args.threads or 'ORT-chosen'} thread(s); "
            f"machine: {describe_machine(machine)}.\n"
            f"Command: `python benchmarks/predsim_accuracy.py {' '.join(sys.argv[1:])}`\n\n"
            + markdown_table(["method", "blocks", "test acc. %", "val. acc. %", "vs bp", "per-block test acc. %",
                              "samples/s", "message bytes/step", "seeds"], table, "lrrrrlrrr")
            + "\nTest accuracy % by K (bp: one block):\n\n"
            + markdown_table(["method"] + [f"K={k}" for k in ks], by_k, "l" + "r" * len(ks))
            + curve_table(rows)
            + "\nPublished (for scale, not this recipe): "
            + "; ".join(f"{where}: {what}" for where, what in PUBLISHED) + ".\n")


def curve_table(rows: list[dict[str, Any]]) -> str:
    """Test accuracy after every epoch (torch backend), one column per method and K, first seed."""
    curves = [r for r in rows if r.get("test_accuracy_per_epoch") and r["seed"] == rows[0]["seed"]]
    if not curves:
        return ""
    epochs = max(len(r["test_accuracy_per_epoch"]) for r in curves)
    body = [[e + 1] + [f"{100 * r['test_accuracy_per_epoch'][e]:.2f}" if e < len(r["test_accuracy_per_epoch"]) else ""
                       for r in curves] for e in range(epochs)]
    return ("\nTest accuracy % after each epoch (the curve; seed " + str(rows[0]["seed"]) + "):\n\n"
            + markdown_table(["epoch"] + [f"{r['variant']} K={r['blocks']}" for r in curves], body,
                             "r" * (len(curves) + 1)))


@functools.cache
def load_test(data_dir: str | None, limit: int | None) -> Dataset:
    return load_fashion_mnist("test", data_dir, limit=limit)


@functools.cache
def load_split(data_dir: str | None, limit: int | None, val_split: int) -> tuple[Dataset, Dataset | None]:
    """Loaded and split once per process: every run sees the same training and validation images."""
    return training_data(None, data_dir, limit, val_split)


def run_job(job: tuple[str, int, int], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One row of the table: ``job`` = (variant, K, seed), trained on the backend ``args`` names."""
    variant, k, seed = job
    data, test = load_split(args.data_dir, args.limit, args.val_split), load_test(args.data_dir, args.test_limit)
    if args.backend == "torch" and args.threads:
        torch.set_num_threads(args.threads)
    row = run_ort(variant, k, args, seed, data, test, workdir) if args.backend == "ort" else \
        run_torch(variant, k, args, seed, data, test)
    tqdm.write(f"{variant} K={k} seed {seed}: test {row['test_accuracy']:.4f} val {row['validation_accuracy']}")
    return {"variant": variant, "method": VARIANTS[variant][0], "head": VARIANTS[variant][1], "blocks": k,
            "seed": seed, **row}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg8b", choices=("vgg8b", "cnn-small", "resnet18"), help="(default: vgg8b)")
    parser.add_argument("--width", type=int, default=128, help="vgg8b width (default: 128, the paper's)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 7],
                        help="K values for the local methods (default: 2 4 7; 7 = one layer per block on vgg8b)")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="(default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="(default: 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    parser.add_argument("--cutout", type=int, default=0, help="cutout square side (default: 0 = off)")
    parser.add_argument("--codec", default="int8", help="message codec of the local methods (default: int8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="(default: 0)")
    parser.add_argument("--val-split", type=int, default=5000, help="held-out training images (default: 5000)")
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all but the validation)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--threads", type=int, default=0, help="ORT threads per block (default: ORT decides)")
    parser.add_argument("--backend", choices=("ort", "torch"), default="ort", help="(default: ort)")
    parser.add_argument("--device", default="cpu", help="torch backend: cpu or cuda (default: cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="torch backend: bf16 runs the blocks under autocast (default: fp32)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's)")
    parser.add_argument("--name", default="predsim_accuracy", help="results file name (default: predsim_accuracy)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process (default: 1; with N > 1 give --threads "
                             "so that N x threads <= cores)")
    args = parser.parse_args(argv)
    if args.backend == "ort" and (args.precision != "fp32" or args.device != "cpu"):
        parser.error("--precision and --device are for --backend torch (the runtime computes in fp32 on the CPU)")
    jobs = [(v, 1 if v == "bp" else k, s) for s in args.seeds for v in args.methods
            for k in ([1] if v == "bp" else args.blocks)]
    keep = keep_path(args.name)  # finished runs survive a crash; rerunning the command reuses them
    same = {k: v for k, v in vars(args).items() if k not in ("seeds", "methods", "blocks", "jobs")}
    with tempfile.TemporaryDirectory() as tmp:  # each process loads the data once
        rows = run_all(run_job, jobs, args, Path(tmp), jobs=args.jobs, desc="predsim_accuracy", keep=keep,
                       settings=same)
    publish(args.name, vars(args), rows, lambda machine: render(rows, args, machine), keep=keep)


if __name__ == "__main__":
    main()
