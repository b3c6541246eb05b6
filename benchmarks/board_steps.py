"""Record every training step of a run on one machine, replay each one alone on another, compare.

A run's weights after many steps cannot be compared across machines at 1e-4: the two CPUs sum in
different orders, messages differ by ~1e-6, and a ReLU input within that of zero passes its
gradient on one machine and not on the other. One such flip moves a conv weight's gradient by
~1e-3 and the run's later steps carry it on (benchmarks/emulated_board.py measures this on the
host alone). So each step is checked alone: the other machine starts from this machine's state
before the step, with this machine's inputs, and must produce its outputs and next state.

    python board_steps.py record [--perturb S] OUT -- train RUN [edgebll train options]
        runs ``edgebll train`` with the portable backend and writes OUT/step-NNNN.npz per block step
        (block folder, message, side input, lr, step, state before and after, outputs); with
        --perturb, every block's input gets N(0, S) noise on its non-zero elements first (how far
        rounding-sized differences carry a run)
    python board_steps.py replay OUT RUN REPLAYED
        replays each recorded step with onnxruntime here, on the graphs of RUN (a copy of the run as
        exported); writes REPLAYED/step-NNNN.npz
    python board_steps.py compare OUT REPLAYED
        prints JSON: per block folder, the largest |replayed - recorded| and the largest share of one
        tensor's elements beyond the tolerance

Only numpy, onnxruntime and edgebll: the replay runs on a board (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4


def _arrays(prefix: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in data.items()}


def _outputs(result) -> dict[str, np.ndarray]:
    outputs = {"loss": np.float32(result.loss), "logits": result.logits}
    if result.message is not None:
        outputs["message"] = result.message
    if result.metric is not None:
        outputs["metric"] = np.float32(result.metric)
    return outputs


def record(out: Path, argv: list[str], perturb: float = 0.0) -> int:
    """``edgebll ARGV`` with each portable block step written to ``out`` (inputs first perturbed by ``perturb``)."""
    from edgebll import cli, portable

    out.mkdir(parents=True, exist_ok=True)
    run = Path(argv[1]).resolve()
    step = portable.PortableRunner.train_step
    count = [0]
    noise = np.random.default_rng(0)

    def recorded(self, x, side, lr):
        if perturb:
            x = x + (noise.standard_normal(x.shape) * perturb * (x != 0)).astype(x.dtype)
        before, at = self.state_arrays(), self.progress["step"]
        result = step(self, x, side, lr)
        np.savez(out / f"step-{count[0]:04d}.npz", block=np.str_(str(self.block_dir.resolve().relative_to(run))),
                 x=x, side=side, lr=np.float32(lr), step=np.int64(at), **_arrays("before", before),
                 **_arrays("after", self.state_arrays()), **_arrays("out", _outputs(result)))
        count[0] += 1
        return result

    portable.PortableRunner.train_step = recorded
    return cli.main(argv)


def _split(data, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) + 1:]: data[k] for k in data.files if k.startswith(prefix + "/")}


def replay(recorded: Path, run: Path, out: Path) -> None:
    """Each step of ``recorded`` from its state before, on the blocks of ``run`` (an untrained copy)."""
    from edgebll.portable import PortableRunner

    out.mkdir(parents=True, exist_ok=True)
    runners: dict[str, PortableRunner] = {}
    for path in sorted(recorded.glob("step-*.npz")):
        with np.load(path) as data:
            block = str(data["block"])
            if block not in runners:
                runners[block] = PortableRunner(run / block, load_trained=False, threads=1)
            runner = runners[block]
            runner.load_state_arrays(_split(data, "before"), int(data["step"]))
            result = runner.train_step(data["x"], data["side"], float(data["lr"]))
            np.savez(out / path.name, **_arrays("after", runner.state_arrays()), **_arrays("out", _outputs(result)))
        print(f"{path.name} {block}: loss {result.loss:.6f}", flush=True)


def gap_summary(gaps: list[np.ndarray], row: dict[str, float] | None = None) -> dict[str, float]:
    """Fold |a - b| tensors into ``row``: the largest difference, and the largest share of one tensor's
    elements beyond TOLERANCE."""
    row = row if row is not None else {"max_abs_difference": 0.0, "share_beyond_tolerance": 0.0}
    row["max_abs_difference"] = max(row["max_abs_difference"], *(float(g.max(initial=0.0)) for g in gaps))
    row["share_beyond_tolerance"] = max(row["share_beyond_tolerance"],
                                        *(float((g > TOLERANCE).mean()) for g in gaps if g.size))
    return row


def compare(recorded: Path, replayed: Path) -> dict[str, dict[str, float]]:
    """Per block folder: the largest |replayed - recorded| over the next state and outputs of all its steps,
    and the largest share of one tensor's elements beyond TOLERANCE."""
    worst: dict[str, dict[str, float]] = {}
    paths = sorted(recorded.glob("step-*.npz"))
    if not paths:
        raise SystemExit(f"{recorded}: no recorded steps")
    for path in paths:
        with np.load(path) as want, np.load(replayed / path.name) as got:
            block = str(want["block"])
            mine = {k: v for k, v in want.items() if k.startswith(("after/", "out/"))}
            if sorted(mine) != sorted(got.files):
                raise SystemExit(f"{path.name}: the replay wrote {sorted(got.files)[:3]}…, the record {sorted(mine)[:3]}…")
            gaps = [np.abs(got[k].astype(np.float64) - v) for k, v in mine.items() if v.dtype.kind == "f"]
            row = worst.setdefault(block, {"steps": 0, "max_abs_difference": 0.0, "share_beyond_tolerance": 0.0})
            row["steps"] += 1
            gap_summary(gaps, row)
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    argv, edgebll_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keep = sub.add_parser("record", help="run `edgebll ARGS` (after --) and record its steps")
    keep.add_argument("out", type=Path)
    keep.add_argument("--perturb", type=float, default=0.0, help="noise on every block's input (default: none)")
    again = sub.add_parser("replay", help="replay recorded steps on this machine")
    again.add_argument("recorded", type=Path)
    again.add_argument("run", type=Path, help="a copy of the run folder as exported (the graphs)")
    again.add_argument("out", type=Path)
    check = sub.add_parser("compare", help="compare a replay with the record (JSON on stdout)")
    check.add_argument("recorded", type=Path)
    check.add_argument("replayed", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        if edgebll_args[:1] != ["train"] or len(edgebll_args) < 2:
            parser.error("record needs the edgebll command after --: record OUT -- train RUN [options]")
        return record(args.out, edgebll_args, args.perturb)
    if args.command == "replay":
        replay(args.recorded, args.run, args.out)
    else:
        print(json.dumps(compare(args.recorded, args.replayed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
