"""Fine-tuning on the board: a run trained on Fashion-MNIST adapts its top block to new, shifted data.

For each model: export and train it on the host (bwbpf, ``--pretrain-limit`` Fashion-MNIST images,
one epoch), make the shifted dataset (``tools/shifted_fashion.py``: five classes, camera gamma,
low contrast, sensor noise), export a run for it that starts from the trained weights
(``--init-from``), evaluate it before any step, then fine-tune it twice from the same start: only
the top block (the others frozen) and every block. Each block's peak memory is measured in its own
fresh process (``edgebll profile``, with and without ``--freeze-blocks``). Writes
benchmarks/results/finetune.{json,md}.

    python benchmarks/finetune.py [--models cnn-small resnet18] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from common import describe_machine, markdown_table, publish  # noqa: E402
from shifted_fashion import make as make_shifted  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.devices.profiles import custom_profile  # noqa: E402
from edgebll.export import export_model  # noqa: E402
from edgebll.profiler import profile_run  # noqa: E402

MIB = 2**20
BLOCKS = {"cnn-small": 2, "resnet18": 4}
PRETRAIN_LIMIT = {"cnn-small": 20000, "resnet18": 5000}


def peaks(run: Path, threads: int, frozen: tuple[int, ...]) -> list[float]:
    """Measured peak MiB per block (its own process, 3 steps), as `edgebll profile [--freeze-blocks]` reports."""
    device = custom_profile(8 << 30, 2, name="host")
    profile = profile_run(run, device, steps=3, threads=threads, plot=False, progress=False, freeze_blocks=frozen)
    return [round(b["measured_peak_bytes"] / MIB, 1) for b in profile["blocks"]]


def one_model(model: str, work: Path, args: argparse.Namespace, shifted: Path) -> dict[str, Any]:
    blocks = BLOCKS[model]
    base = export_model(model, out=work / f"{model}-base", blocks=blocks, batch_size=64, lr=2e-3, portable=False,
                        progress=False)
    began = time.perf_counter()
    Runtime.from_run(base, threads=args.threads).train(limit=args.pretrain_limit or PRETRAIN_LIMIT[model],
                                                         progress=False)
    pretrain_s = time.perf_counter() - began
    home = Runtime.from_run(base, threads=args.threads).evaluate(progress=False)["test_accuracy"]
    start = export_model(model, out=work / f"{model}-ft", blocks=blocks, batch_size=64, lr=args.lr, portable=False,
                         progress=False, data=shifted, init_from=base)
    before = Runtime.from_run(start, threads=args.threads).evaluate(progress=False)
    frozen = tuple(range(blocks - 1))
    result: dict[str, Any] = {"model": model, "blocks": blocks, "pretrain_images": args.pretrain_limit
                              or PRETRAIN_LIMIT[model], "pretrain_s": round(pretrain_s, 1),
                              "fashion_mnist_accuracy": home, "before": before["test_accuracy"]}
    for name, freeze in (("top_block", frozen), ("all_blocks", ())):
        run = Path(shutil.copytree(start, work / f"{model}-{name}"))
        began = time.perf_counter()
        summary = Runtime.from_run(run, threads=args.threads, freeze_blocks=freeze).train(
            epochs=args.epochs, progress=False)
        result[name] = {"after": Runtime.from_run(run, threads=args.threads).evaluate(progress=False)["test_accuracy"],
                        "steps": summary["steps"], "seconds": round(time.perf_counter() - began, 1),
                        "peak_mib": peaks(start, args.threads, freeze)}
        shutil.rmtree(run)
    return result


def render(rows: list[dict[str, Any]], settings: dict[str, Any], machine: dict[str, Any]) -> str:
    table = []
    for r in rows:
        for name, label in (("top_block", "top block (others frozen)"), ("all_blocks", "every block")):
            part = r[name]
            table.append([r["model"], r["blocks"], label, f"{100 * r['fashion_mnist_accuracy']:.1f}",
                          f"{100 * r['before']:.1f}", f"{100 * part['after']:.1f}", part["steps"], part["seconds"],
                          " / ".join(f"{p:.0f}" for p in part["peak_mib"])])
    return (f"# Fine-tuning on shifted data\n\n{describe_machine(machine)}\n\n"
            f"Pretrained on Fashion-MNIST (bwbpf, one epoch); fine-tuned {settings['epochs']} epochs on "
            f"{settings['train']} low-light images of five classes (`tools/shifted_fashion.py`), tested on "
            f"{settings['test']}. Peak memory per block is measured in its own process above an idle runtime "
            "(`edgebll profile`, with `--freeze-blocks` for the frozen blocks).\n\n"
            + markdown_table(["model", "blocks", "trained", "Fashion-MNIST %", "shifted before %", "shifted after %",
                              "steps", "seconds", "peak MiB per block"], table, "lrlrrrrrl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn-small", "resnet18"], choices=sorted(BLOCKS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: 1e-3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-limit", type=int, default=None, help="pretraining images (default: per model)")
    parser.add_argument("--train", type=int, default=3000, help="shifted training images")
    parser.add_argument("--test", type=int, default=1000, help="shifted test images")
    parser.add_argument("--name", default="finetune")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        shifted = make_shifted(Path(tmp) / "low-light", train=args.train, test=args.test)
        for model in args.models:
            rows.append(one_model(model, Path(tmp), args, shifted))
            print(rows[-1], flush=True)
    settings = {k: getattr(args, k) for k in ("models", "epochs", "lr", "threads", "pretrain_limit", "train", "test")}
    publish(args.name, settings, rows, lambda machine: render(rows, settings, machine))


if __name__ == "__main__":
    main()
