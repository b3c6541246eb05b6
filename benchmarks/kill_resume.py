"""Nothing lost to a kill: SIGKILL `edgebll train` at random moments, `--resume`, compare with the uninterrupted run.

The model is exported once (cnn-small in 2 blocks by default); an uninterrupted
``edgebll train RUN --epochs 2 --limit 2048 --checkpoint-every N`` gives the reference weights. Each
trial trains a fresh copy and SIGKILLs it: "random" trials after a random checkpoint and a random
part of a step later (anywhere in training); "between saves" trials the moment block 0 has saved a
step that the last block has not (the window a run-level checkpoint exists for). It records what
the kill left on disk (blocks at different steps? temporary files?), resumes with ``--resume`` to
the end, and compares every weight byte for byte and train.json's epochs (samples and loss) with
the reference. Writes benchmarks/results/kill_resume.{json,md}.

    python benchmarks/kill_resume.py [--trials 20] [--checkpoint-every 1 5] [--backend auto] [--model resnet18]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, markdown_table, publish  # noqa: E402

from edgebll import Runtime  # noqa: E402
from edgebll.checkpoints import PROGRESS_NAME  # noqa: E402
from edgebll.export import export_model  # noqa: E402
from edgebll.runner import trained_step  # noqa: E402
from edgebll.run_folder import block_dirs  # noqa: E402


def train_command(run: Path, args: argparse.Namespace, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgebll", "train", str(run), "--epochs", "2", "--limit", str(args.limit),
            "--checkpoint-every", str(every), "--threads", "1", "--backend", args.backend, "--no-progress", *extra]


def weights(run: Path, backend: str) -> dict[str, bytes]:
    runtime = Runtime.from_run(run, threads=1, backend=backend)
    return {f"{r.block_dir.relative_to(run)}/{k}": v.tobytes() for r in runtime.all_runners
            for k, v in r.parameters().items()}


def epochs_of(run: Path) -> list[tuple[int, list[float]]]:
    return [(e["samples"], e["loss"]) for e in json.loads((run / "train.json").read_text())["epochs"]]


def marked_step(run: Path) -> int:
    try:
        return json.loads((run / PROGRESS_NAME).read_text())["step"]
    except (OSError, ValueError):
        return -1


def saved_step(block_dir: Path) -> int:
    """The step in a block's newest sidecar (what it has saved, or is saving), -1 before its first save."""
    for name in ("checkpoint.json", "portable_state.json"):
        try:
            return json.loads((block_dir / "trained" / name).read_text())["step"]
        except (OSError, ValueError):
            continue
    return -1


def kill(cmd: list[str], run: Path, mode: str, step: int, delay: float) -> bool:
    """Run ``cmd`` and SIGKILL it ("random": ``delay`` s after checkpoint ``step``; "between saves": once block 0
    has saved a step after ``step`` that the last block has not). False: it finished first."""
    blocks = json.loads((run / "run.json").read_text())["blocks"]
    first, last = run / "block-0", run / f"block-{blocks - 1}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and marked_step(run) < step:
        time.sleep(0.001)
    if mode == "random":
        time.sleep(delay)
    else:
        while proc.poll() is None and saved_step(first) <= saved_step(last):
            pass  # spin: the window is a few milliseconds
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def trial(exported: Path, work: Path, args: argparse.Namespace, every: int, mode: str, step: int, delay: float,
          expected: dict[str, bytes], expected_epochs: list) -> dict[str, Any]:
    run = Path(shutil.copytree(exported, work / "trial"))
    try:
        killed = kill(train_command(run, args, every), run, mode, step, delay)
        steps = [trained_step(d) for d in block_dirs(run)]
        marked = marked_step(run)
        leftovers = [p.name for p in run.rglob("*") if p.name.endswith((".tmp", ".restore"))]
        resumed = subprocess.run(train_command(run, args, every, "--resume"), capture_output=True, text=True)
        same = resumed.returncode == 0 and weights(run, args.backend) == expected
        return {"checkpoint_every": every, "mode": mode, "after_step": step, "delay_s": round(delay, 4),
                "killed": killed, "block_steps": steps, "marked_step": marked, "mixed_steps": len(set(steps)) > 1,
                "leftovers": leftovers, "resumed": resumed.returncode == 0,
                "error": resumed.stderr[-400:] if resumed.returncode else "", "same_weights": same,
                "whole_epochs": same and epochs_of(run) == expected_epochs}
    finally:
        shutil.rmtree(run, ignore_errors=True)


def render(rows: list[dict[str, Any]], settings: dict[str, Any], machine: dict[str, Any]) -> str:
    table = []
    for every, mode in ((e, m) for e in settings["checkpoint_every"] for m in ("random", "between saves")):
        mine = [r for r in rows if r["checkpoint_every"] == every and r["mode"] == mode and r["killed"]]
        table.append([every, mode, len(mine), sum(r["mixed_steps"] for r in mine), sum(bool(r["leftovers"]) for r in mine),
                      sum(r["resumed"] for r in mine), sum(r["same_weights"] for r in mine),
                      sum(r["whole_epochs"] for r in mine)])
    return (f"# Kill and resume\n\n{describe_machine(machine)}\n\n"
            f"{settings['model']} in {settings['blocks']} blocks, backend {settings['backend']}, 2 epochs of "
            f"{settings['limit']} Fashion-MNIST images; each trial SIGKILLs `edgebll train` (random: after a random "
            "checkpoint and a random part of a step; between saves: when block 0 has saved a step the last block "
            "has not), then `--resume`s it to the end and compares with an uninterrupted run.\n\n"
            + markdown_table(["--checkpoint-every", "kill", "kills", "blocks at different steps", "left temp files",
                              "resumed", "weights byte-equal", "train.json whole"], table, "rlrrrrrr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20,
                        help="kills of each kind per --checkpoint-every value (default: 20)")
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2048)
    parser.add_argument("--backend", default="auto", choices=["auto", "ort-training", "portable"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--name", default="kill_resume")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        exported = export_model(args.model, out=Path(tmp) / "run", blocks=args.blocks, batch_size=64,
                                portable=args.backend != "ort-training", progress=False)
        for every in args.checkpoint_every:
            straight = Path(shutil.copytree(exported, Path(tmp) / f"straight-{every}"))
            began = time.monotonic()
            done = subprocess.run(train_command(straight, args, every), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the uninterrupted run failed: {done.stderr[-400:]}")
            total = json.loads((straight / "train.json").read_text())["steps"]
            step_s = (time.monotonic() - began) / total
            expected, expected_epochs = weights(straight, args.backend), epochs_of(straight)
            checkpoints = [s for s in range(every, total - every, every)]
            for i in tqdm(range(2 * args.trials), desc=f"--checkpoint-every {every}"):
                mode = "random" if i % 2 == 0 else "between saves"
                rows.append(trial(exported, Path(tmp), args, every, mode, int(rng.choice(checkpoints)),
                                  float(rng.uniform(0, every * step_s)), expected, expected_epochs))
    settings = {"model": args.model, "blocks": args.blocks, "limit": args.limit, "backend": args.backend,
                "checkpoint_every": args.checkpoint_every, "trials": args.trials, "seed": args.seed}
    publish(args.name, settings, rows, lambda machine: render(rows, settings, machine))


if __name__ == "__main__":
    main()
