"""The BLL paper's sequence task (its Figure 3C shape): per-token test accuracy vs number of blocks.

The 20-layer, one-head transformer (``--model transformer``) learns to reverse a random
permutation of 0..9. bp trains it end to end (one block); bwbpf and bll split its 20 layers into
K blocks. Every (method, K, seed) is exported once, with the same initial weights for every K (the
export seed), and trained from those weights for each budget in ``--epochs`` (with the cosine
schedule over that budget), all by the edgebll runtime (ONNX Runtime, in process, messages
through the codec). Writes benchmarks/results/sequence_task.{json,md,png}.

    python benchmarks/sequence_task.py --threads 1                     # the README's table (~20 min, 1 core)
    python benchmarks/sequence_task.py --blocks 4 20 --seeds 0 --epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table, write_results  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.export import export_model  # noqa: E402

METHODS = ("bp", "bwbpf", "bll")
MODEL = "transformer"


def run_method(method: str, blocks: int, seed: int, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Export one (method, blocks, seed), train it once per budget from the exported weights; one row per budget."""
    out = export_model(MODEL, out=workdir / f"{method}-{blocks}-{seed}", method=method, blocks=blocks,
                       batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False)
    rows = []
    for epochs in args.epochs:
        # load_trained=False: every budget starts from the exported weights, not the previous budget's
        runtime = Runtime.from_run(out, threads=args.threads, load_trained=False)
        train = runtime.train(epochs=epochs, codec=args.codec, limit=args.train_size, seed=seed, progress=False)
        evaluation = runtime.evaluate(limit=args.test_size, progress=False)
        rows.append({"method": method, "blocks": blocks, "seed": seed, "epochs": epochs, "steps": train["steps"],
                     "test_accuracy": evaluation["test_accuracy"],
                     "per_block_accuracy": evaluation["per_block_accuracy"],
                     "test_sequences": evaluation["samples"], "samples_per_s": train["samples_per_s"],
                     "message_bytes_per_step": sum(train["message_bytes_per_step"])
                     + sum(train["feedback_bytes_per_step"]),
                     "train_seconds": train["seconds"]})
    return rows


def jobs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(method, blocks, seed) in the order they run: bp has one block, the others every --blocks."""
    return [(method, k, seed) for seed in args.seeds for method in args.methods
            for k in ([1] if method == "bp" else args.blocks)]


def _accuracy_cell(rows: list[dict]) -> str:
    accs = [100 * r["test_accuracy"] for r in rows]
    return f"{statistics.mean(accs):.1f}" + (f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else "")


def render(rows: list[dict], args: argparse.Namespace, machine: dict) -> str:
    # steps of one run at each budget: the same for every method, K and seed
    steps = {e: next(r["steps"] for r in rows if r["epochs"] == e) for e in args.epochs}
    table = []
    for method, blocks in dict.fromkeys((m, k) for m, k, _ in jobs(args)):
        mine = [r for r in rows if r["method"] == method and r["blocks"] == blocks]
        table.append([method, blocks, *[_accuracy_cell([r for r in mine if r["epochs"] == e]) for e in args.epochs],
                      f"{statistics.mean(r['samples_per_s'] for r in mine):.0f}",
                      f"{statistics.mean(r['message_bytes_per_step'] for r in mine):,.0f}"])
    budgets = [f"{e} ep. ({steps[e]} steps)" for e in args.epochs]
    seeds = f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    return (f"# Sequence task: per-token accuracy vs number of blocks\n\n"
            f"Reverse a random permutation of 0..9; {MODEL}: embedding + 20 one-head pre-norm layers (d_model 64); "
            f"{args.train_size} training sequences, {args.test_size} test sequences (none seen in training), "
            f"batch {args.batch_size}, AdamW lr {args.lr} cosine over each budget, {args.codec} messages, "
            f"{seeds}. Test accuracy is per token, of the last block's head (chance: 10 %). "
            f"Machine: {describe_machine(machine)}.\n"
            f"Command: `python benchmarks/sequence_task.py {' '.join(sys.argv[1:])}`\n\n"
            + markdown_table(["method", "blocks", *[f"acc. % after {b}" for b in budgets], "samples/s",
                              "message bytes/step"], table, "lr" + "r" * len(budgets) + "rr"))


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> Path | None:
    """Accuracy vs blocks, one panel per budget, one line per method (bp as a dashed level); None without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(args.epochs), figsize=(4 * len(args.epochs), 3.4), sharey=True, squeeze=False)
    for ax, epochs in zip(axes[0], args.epochs):
        at = [r for r in rows if r["epochs"] == epochs]
        for method in args.methods:
            mine = [r for r in at if r["method"] == method]
            ks = sorted({r["blocks"] for r in mine})
            means = [100 * statistics.mean(r["test_accuracy"] for r in mine if r["blocks"] == k) for k in ks]
            if method == "bp":
                ax.axhline(means[0], color="k", linestyle="--", label="bp (1 block)")
            else:
                ax.plot(ks, means, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(args.blocks, [str(k) for k in args.blocks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log scale's minor labels read "3×10⁰"
        ax.set_xlabel("blocks K")
        ax.set_title(f"{epochs} epoch{'s' if epochs > 1 else ''}, {at[0]['steps']} steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("per-token test accuracy %")
    axes[0][-1].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(default: all)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 5, 10, 20],
                        help="block counts K for bwbpf and bll; bp is always 1 (default: 2 4 5 10 20)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4],
                        help="training budgets, each trained from the exported weights (default: 1 2 4)")
    parser.add_argument("--train-size", type=int, default=4096,
                        help="training sequences: the first N of the task's seeded training split (default: 4096)")
    parser.add_argument("--test-size", type=int, default=2048, help="test sequences (default: all 2048)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--codec", default="int8", help="message codec, activations up and beta down (default: int8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the initial weights and the shuffling (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=0, help="ORT threads per block (default: ORT decides)")
    parser.add_argument("--name", default="sequence_task", help="results file name (default: sequence_task)")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, blocks, seed in tqdm(jobs(args), desc="sequence task", unit="export"):
            rows += run_method(method, blocks, seed, args, Path(tmp))
    machine = machine_info()
    json_path, md_path = write_results(args.name, {"machine": machine, "settings": vars(args), "rows": rows},
                                       render(rows, args, machine))
    figure = plot(rows, args, json_path.with_suffix(".png"))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
