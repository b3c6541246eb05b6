"""Pool the rows of several accuracy.py results that share one recipe, and compare the methods seed by seed.

accuracy.py runs take half an hour or more each here, so a study's seeds are measured across several
runs (several results files). This reads them, refuses any whose recipe differs (model, blocks, epochs,
batch, optimizer, codec, data, evaluation batch, BLL schedule) or that measure one (method, seed) twice,
and writes one table: each method's mean ± std over all its seeds, and the paired differences
between methods on the seeds both have (mean, standard error, and on how many seeds the first is ahead
or level). It trains nothing. Writes benchmarks/results/NAME.{json,md}.

    python benchmarks/pool_accuracy.py accuracy_3epochs accuracy_3epochs_seeds34 --name accuracy_3epochs_pooled
    python benchmarks/pool_accuracy.py benchmarks/results/accuracy_10epochs*.json --name accuracy_10epochs_pooled
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, describe_machine, differing_settings, markdown_table, publish  # noqa: E402

# Settings that vary between runs of one study without changing what is measured.
NOT_RECIPE = ("seeds", "methods", "jobs", "threads", "name")
# Settings that accuracy.py gained after some results were written, with the value those results
# used: evaluation took 500-image batches before --eval-batch-size existed, and the BLL schedule
# and validation split had their present defaults before they became options.
ADDED_LATER = {"eval_batch_size": 500, "val_split": 0, "mix_start": 2.0, "mix_end": 0.5, "feedback_lr_scale": 10.0}
ORDER = ("bp", "bwbpf", "bll")
# (a, b): a - b is reported. BLL against BWBPF first: that is the comparison the BLL issue asks about.
PAIRS = (("bll", "bwbpf"), ("bll", "bp"), ("bwbpf", "bp"))


def resolve(source: str) -> Path:
    """A results file: a path, or a name in benchmarks/results ("accuracy_10epochs" or "accuracy_10epochs.json")."""
    path = Path(source)
    if not path.is_file() and path.parent == Path("."):
        path = RESULTS_DIR / (source if source.endswith(".json") else f"{source}.json")
    if not path.is_file():
        raise SystemExit(f"pool_accuracy: no results file {source!r} (looked for {path}); give a path or the name of "
                         f"a file in {RESULTS_DIR}")
    return path


def recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two runs' rows to be pooled; the evaluation batch is made explicit."""
    full = {**ADDED_LATER, **settings}
    if full["eval_batch_size"] is None:  # None: the run's training batch
        full["eval_batch_size"] = full["batch_size"]
    return {k: v for k, v in sorted(full.items()) if k not in NOT_RECIPE}


def load(sources: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The shared recipe, the pooled rows (each with its source's name) and each source's description."""
    shared: dict[str, Any] | None = None
    first = ""
    rows: list[dict[str, Any]] = []
    described = []
    seen: dict[tuple[str, int], str] = {}
    for source in sources:
        path = resolve(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            settings, machine, mine = data["settings"], data["machine"], data["rows"]
            if not mine or "test_accuracy" not in mine[0] or "model" not in settings:
                raise KeyError("rows with test_accuracy, settings with model")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"pool_accuracy: {path} is not a results file of benchmarks/accuracy.py ({exc!r})") from exc
        mine_recipe = recipe(settings)
        if shared is None:
            shared, first = mine_recipe, path.name
        else:
            differ = [f"{k}: {shared.get(k)!r} in {first} vs {mine_recipe.get(k)!r} in {path.name}"
                      for k in differing_settings(shared, mine_recipe)]
            if differ:
                raise SystemExit("pool_accuracy: these runs used different recipes, so their accuracies are not one "
                                 "sample; pool only runs of one recipe:\n  " + "\n  ".join(differ))
        for row in mine:
            key = (row["method"], row["seed"])
            if key in seen:
                raise SystemExit(f"pool_accuracy: {key[0]} seed {key[1]} is in both {seen[key]} and {path.name}; "
                                 f"give each (method, seed) once")
            seen[key] = path.name
            rows.append({**row, "source": path.name})
        described.append({"source": path.name, "command": machine.get("command"), "machine": machine})
    assert shared is not None  # argparse asks for at least one source
    return shared, rows, described


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per method: seeds, accuracies, mean, std. Per pair (a, b): the seeds both have and a - b on each."""
    accuracy = {(r["method"], r["seed"]): 100 * r["test_accuracy"] for r in rows}
    methods = [m for m in ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    per_method = []
    for m in methods:
        seeds = sorted(s for (mm, s) in accuracy if mm == m)
        accs = [accuracy[m, s] for s in seeds]
        per_method.append({"method": m, "seeds": seeds, "test_accuracy": accs, "mean": statistics.mean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else None})
    pairs = []
    for a, b in PAIRS:
        seeds = sorted(s for (m, s) in accuracy if m == a and (b, s) in accuracy)
        if not seeds:
            continue
        diffs = [accuracy[a, s] - accuracy[b, s] for s in seeds]
        pairs.append({"a": a, "b": b, "seeds": seeds, "differences": diffs, "mean": statistics.mean(diffs),
                      "standard_error": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
                      "ahead_or_level": sum(d >= -1e-9 for d in diffs)})
    return per_method, pairs


def render(shared: dict[str, Any], per_method: list[dict[str, Any]], pairs: list[dict[str, Any]],
           described: list[dict[str, Any]], command: str) -> str:
    def pm(x: float | None) -> str:
        return "" if x is None else f" ± {x:.2f}"

    methods = [[p["method"], 1 if p["method"] == "bp" else shared["blocks"], f"{p['mean']:.2f}{pm(p['std'])}",
                " / ".join(f"{a:.2f}" for a in p["test_accuracy"]), " ".join(map(str, p["seeds"]))]
               for p in per_method]
    compared = [[f"{p['a']} − {p['b']}", f"{p['mean']:+.2f}{pm(p['standard_error'])}",
                 " / ".join(f"{d:+.2f}" for d in p["differences"]), " ".join(map(str, p["seeds"])),
                 f"{p['ahead_or_level']} of {len(p['seeds'])}"] for p in pairs]
    bll = "" if not any(p["method"] == "bll" for p in per_method) else (
        f"; bll: mix {shared['mix_start']} to {shared['mix_end']}, feedback lr x{shared['feedback_lr_scale']:g}")
    machines = sorted({describe_machine(d["machine"]) for d in described})
    runs = "\n".join(f"- `{d['source']}`: `python benchmarks/{d['command']}`" for d in described)
    return (f"# Accuracy, pooled over runs: bp vs bwbpf vs bll\n\n"
            f"{shared['model']}, {shared['epochs']} epoch(s), batch {shared['batch_size']}, AdamW lr {shared['lr']} "
            f"cosine, {shared['codec']} messages, {shared['limit'] or 60000 - shared['val_split']} training images, "
            f"{shared['test_limit'] or 10000} test images, evaluated in batches of {shared['eval_batch_size']}{bll}; "
            f"machine: {'; or '.join(machines)}.\nCommand: `python benchmarks/{command}`\n\nRuns pooled:\n{runs}\n\n"
            + markdown_table(["method", "blocks", "test acc. % (mean ± std)", "per seed", "seeds"], methods, "lrrlr")
            + "\nPaired by seed (difference in points; ± is the standard error of the mean difference):\n\n"
            + markdown_table(["comparison", "mean difference", "per seed", "seeds", "first ahead or level"], compared,
                             "lrlrr"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="accuracy.py results: paths, or names in benchmarks/results")
    parser.add_argument("--name", default="accuracy_pooled", help="results file name (default: accuracy_pooled)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default: {RESULTS_DIR})")
    args = parser.parse_args(argv)
    shared, rows, described = load(args.sources)
    per_method, pairs = summarise(rows)
    command = " ".join(["pool_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    publish(args.name, {"recipe": shared, "sources": described, "methods": per_method, "pairs": pairs}, rows,
            lambda machine: render(shared, per_method, pairs, described, command), results_dir=args.out)


if __name__ == "__main__":
    main()
