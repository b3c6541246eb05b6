"""Every benchmark script starts: its imports resolve and its --help explains it (they run for hours, not here)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = sorted(p for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.name != "common.py")


def test_the_benchmarks_are_all_found() -> None:
    assert {"accuracy.py", "memory_k_sweep.py", "pipeline_scaling.py"} <= {p.name for p in BENCHMARKS}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_help(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script.name}"), done.stdout


@pytest.mark.slow
def test_the_gpu_session_script_runs_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_session.sh end to end on the CPU, tiny (the same script a GPU machine runs), and its refusals."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "PRECISION": "fp32", "EPOCHS": "1", "OUT": str(out),
           "EXTRA": "--limit 128 --val-split 100 --test-limit 100 --width 8 --threads 1 --jobs 1 --methods bp bll"}
    done = subprocess.run(["bash", str(script), "predsim"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bll K=4 seed 0 epoch 1/1: test" in done.stdout  # the curve, printed as it comes
    rows = json.loads((out / "predsim_accuracy_vgg8b_gpu.json").read_text())["rows"]
    assert [(r["variant"], r["blocks"]) for r in rows] == [("bp", 1), ("bll", 4)]
    assert (out / "predsim_accuracy_vgg8b_gpu.md").is_file()
    wrong = subprocess.run(["bash", str(script), "vgg"], capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode == 2 and "unknown plan 'vgg'; choose predsim or resnet18" in wrong.stderr
    alone = tmp_path / "checkout" / "benchmarks"  # a checkout with no .whl/ carried
    alone.mkdir(parents=True)
    shutil.copy(script, alone)
    bare = subprocess.run(["bash", str(alone / script.name), "resnet18"], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHON": "/usr/bin/env"})  # a "python" that imports nothing
    assert bare.returncode == 2 and "hint: run make device-carry" in bare.stderr


@pytest.mark.slow
def test_cuda_step_rehearses_on_the_cpu_and_rebuilds_a_carried_runs_state(tmp_path: Path) -> None:
    """benchmarks/cuda_step.py with --provider cpu --device cpu: both providers of the check are the CPU, so the
    steps are bit-equal; a run carried without a state file gets the exported one back from the seed."""
    from edgebll.export import export_model

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_step.py"
    runs = tmp_path / "runs"
    export_model("cnn-small", out=runs / "cnn-small", blocks=2, batch_size=16, seed=0, lr=1e-3, progress=False)
    state = runs / "cnn-small" / "block-1" / "portable_state.npz"
    with np.load(state) as f:
        exported = dict(f)
    state.unlink()
    out = tmp_path / "out" / "cuda_step"
    args = [sys.executable, str(script), "--provider", "cpu", "--device", "cpu", "--models", "cnn-small", "--blocks",
            "2", "--batch-size", "16", "--repeats", "2", "--warmup", "0", "--check-steps", "2", "--name", str(out)]
    done = subprocess.run([*args, "--runs", str(runs)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(state) as f:
        rebuilt = dict(f)
    assert list(rebuilt) == list(exported) and all(np.array_equal(rebuilt[k], exported[k]) for k in exported)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["block"]) for r in rows] == [("cnn-small", 0), ("cnn-small", 1)]
    assert all(r["parity"] == {"output_diff": 0.0, "params_beyond": 0.0, "params_max_over_lr": 0.0, "buffers_diff": 0.0}
               for r in rows)
    assert "| cnn-small | 1 |" in out.with_suffix(".md").read_text()
    missing = subprocess.run([*args, "--runs", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "none/cnn-small does not exist; hint: export cnn-small" in missing.stderr


def _accuracy_result(path: Path, seeds: list[int], accuracies: dict[str, list[float]], **settings: object) -> Path:
    """A results file shaped like benchmarks/accuracy.py's, with the given test accuracies (fractions)."""
    recipe = {"model": "cnn-small", "blocks": 4, "epochs": 10, "batch_size": 64, "lr": 0.002, "codec": "int8",
              "limit": None, "test_limit": None, "eval_batch_size": None, "val_split": 0, "mix_start": 2.0,
              "mix_end": 0.5, "feedback_lr_scale": 10.0, "seeds": seeds, "threads": 1, "jobs": 2, "name": path.stem}
    recipe.update(settings)
    recipe = {k: v for k, v in recipe.items() if v != "absent"}
    rows = [{"method": m, "seed": s, "test_accuracy": a, "per_block_accuracy": [a]}
            for m, accs in accuracies.items() for s, a in zip(seeds, accs)]
    machine = {"cpu_model": "test CPU", "command": f"accuracy.py --name {path.stem}"}
    path.write_text(json.dumps({"machine": machine, "settings": recipe, "rows": rows}))
    return path


def test_pool_accuracy_pools_seeds_across_runs_and_pairs_them(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    import pool_accuracy

    a = _accuracy_result(tmp_path / "a.json", [0], {"bp": [0.9372], "bwbpf": [0.9320], "bll": [0.9334]})
    b = _accuracy_result(tmp_path / "b.json", [1, 2], {"bwbpf": [0.9347, 0.9300], "bll": [0.9361, 0.9290]})
    pool_accuracy.main([str(a), str(b), "--out", str(tmp_path / "out"), "--name", "pooled"])
    data = json.loads((tmp_path / "out" / "pooled.json").read_text())
    methods = {m["method"]: m for m in data["settings"]["methods"]}
    assert methods["bll"]["seeds"] == [0, 1, 2] and methods["bp"]["seeds"] == [0]
    assert abs(methods["bll"]["mean"] - (93.34 + 93.61 + 92.90) / 3) < 1e-9
    pair = data["settings"]["pairs"][0]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("bll", "bwbpf", [0, 1, 2])
    assert [round(d, 2) for d in pair["differences"]] == [0.14, 0.14, -0.10] and pair["ahead_or_level"] == 2
    assert abs(pair["standard_error"] - statistics.stdev(pair["differences"]) / 3 ** 0.5) < 1e-9
    md = (tmp_path / "out" / "pooled.md").read_text()
    assert "| bll − bwbpf | +0.06 ± 0.08 | +0.14 / +0.14 / -0.10 | 0 1 2 | 2 of 3 |" in md
    assert "| bll − bp | -0.38 | -0.38 | 0 | 0 of 1 |" in md


def test_pool_accuracy_refuses_other_recipes_and_repeated_seeds(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    import pool_accuracy

    out = ["--out", str(tmp_path / "out")]
    ten = _accuracy_result(tmp_path / "ten.json", [0], {"bll": [0.93]})
    three = _accuracy_result(tmp_path / "three.json", [1], {"bll": [0.92]}, epochs=3)
    with pytest.raises(SystemExit, match=r"different recipes.*\n  epochs: 10 in ten.json vs 3 in three.json$"):
        pool_accuracy.main([str(ten), str(three), *out])
    again = _accuracy_result(tmp_path / "again.json", [0], {"bll": [0.94]})
    with pytest.raises(SystemExit, match=r"bll seed 0 is in both ten.json and again.json"):
        pool_accuracy.main([str(ten), str(again), *out])
    # Results written before --eval-batch-size existed were evaluated at 500: they pool with 500, not with the default.
    legacy = _accuracy_result(tmp_path / "legacy.json", [2], {"bll": [0.92]}, eval_batch_size="absent")
    with pytest.raises(SystemExit, match=r"eval_batch_size: 64 in ten.json vs 500 in legacy.json"):
        pool_accuracy.main([str(ten), str(legacy), *out])
    at500 = _accuracy_result(tmp_path / "at500.json", [3], {"bll": [0.93]}, eval_batch_size=500)
    pool_accuracy.main([str(legacy), str(at500), *out])
    assert (tmp_path / "out" / "accuracy_pooled.md").is_file()
    with pytest.raises(SystemExit, match=r"no results file 'missing' \(looked for .*missing.json\)"):
        pool_accuracy.main(["missing", *out])
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit, match=r"other.json is not a results file of benchmarks/accuracy.py"):
        pool_accuracy.main([str(tmp_path / "other.json"), *out])


def _square_unless_three(item: int, calls: Path) -> int:
    """A run for run_all: squares its item, fails on 3 (module level, so spawned processes can import it)."""
    with calls.open("a") as f:
        f.write(f"{item}\n")
    if item == 3:
        raise ValueError("three fails")
    return item * item


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_all_keeps_finished_runs_and_reruns_only_the_rest(tmp_path: Path, jobs: int) -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    from common import keep_path, publish, run_all

    keep, calls = keep_path("study", tmp_path), tmp_path / "calls"
    assert keep == tmp_path / ".study.partial.jsonl"
    assert keep_path("/elsewhere/study", tmp_path) == Path("/elsewhere/.study.partial.jsonl")
    with pytest.raises(RuntimeError, match=r"1 of 5 run\(s\) failed, first 3"):
        run_all(_square_unless_three, [0, 1, 2, 3, 4], calls, jobs=jobs, keep=keep, settings={"epochs": 2})
    # With one process the failure stops the benchmark (4 never runs); with two, the other runs finish.
    assert sorted(int(x) for x in calls.read_text().split()) == ([0, 1, 2, 3] if jobs == 1 else [0, 1, 2, 3, 4])
    calls.unlink()
    with pytest.raises(SystemExit, match=r"holds finished runs of other settings \(epochs: 2 there, 3 now\)"):
        run_all(_square_unless_three, [0, 1, 2, 4], calls, jobs=jobs, keep=keep, settings={"epochs": 3})
    assert run_all(_square_unless_three, [4, 0, 1, 2], calls, jobs=jobs, keep=keep, settings={"epochs": 2}) == [16, 0, 1, 4]
    ran = calls.read_text().split() if calls.exists() else []
    assert ran == ([] if jobs == 2 else ["4"])  # only what had not finished ran again
    publish("study", {}, [], lambda machine: "table", results_dir=tmp_path, keep=keep)
    assert not keep.exists() and (tmp_path / "study.md").read_text() == "table\n"


def test_alloc_timeline_reads_the_traced_step_and_walks_liveness() -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    import alloc_timeline

    trace = ["11 100.000000 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, -1, 0) = 0x10",  # before the mark: not counted
             '11 100.500000 write(2, "ALLOC_TIMELINE_START\\n", 21) = 21',
             "11 100.600000 mmap(NULL, 1000, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xa0",
             "12 100.700000 mmap(NULL, 3000, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xb0",
             "11 100.800000 munmap(0xa0, 1000) = 0",
             "11 100.900000 munmap(0x10, 4096) = 0",  # mapped before the mark: ignored
             "11 101.000000 mmap(NULL, 500, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xc0",
             '11 101.500000 write(2, "ALLOC_TIMELINE_END\\n", 19) = 19',
             "11 101.600000 mmap(NULL, 9999, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xd0"]
    traced = alloc_timeline.parse_trace(trace)
    assert traced["peak_bytes"] == 4000 and abs(traced["peak_s"] - 0.2) < 1e-9
    assert [size for _, size in traced["live"]] == [1000, 3000]
    assert traced["left_bytes"] == 3500 and abs(traced["step_s"] - 1.0) < 1e-9
    with pytest.raises(ValueError, match="no ALLOC_TIMELINE_START/ALLOC_TIMELINE_END pair"):
        alloc_timeline.parse_trace(trace[:4])

    # a -> view v -> b(v) -> c(a, b); c is the graph output: a's buffer lives through its view's last use
    node = lambda name, inputs, outputs, view=False: {  # noqa: E731
        "name": name, "inputs": inputs, "outputs": outputs, "view": view}
    order = [node("A", ["x"], {"a": 100}), node("V", ["a"], {"v": 100}, view=True), node("B", ["v"], {"b": 10}),
             node("C", ["a", "b"], {"c": 1}), node("D", ["x"], {"d": 50})]
    walk = alloc_timeline.liveness(order, {"c"})
    assert [sorted(alive) for alive in walk] == [["a"], ["a"], ["a", "b"], ["a", "b", "c"], ["c", "d"]]


def test_portable_ops_thread_scaling_counts_the_op_types_that_do_not_speed_up() -> None:
    sys.path.insert(0, str(BENCHMARKS[0].parent))
    from portable_ops import thread_scaling

    def row(threads: int, by_op: dict[str, float]) -> dict:
        return {"model": "m", "block": "block-0", "threads": threads, "by_op": by_op, "kernel_ms": sum(by_op.values())}

    rows = [row(1, {"Conv": 80.0, "Pad": 10.0, "Cast": 2.0}), row(2, {"Conv": 40.0, "Pad": 9.5, "Cast": 0.5})]
    scaling = thread_scaling(rows, 1, 2)
    assert scaling["ops"] == ["Conv", "Pad", "Cast"] and (scaling["few"], scaling["many"]) == (1, 2)
    (block,) = scaling["blocks"]
    assert block["ops"]["Conv"] == [80.0, 40.0, 2.0] and block["ops"]["Pad"] == [10.0, 9.5, 1.05]
    assert block["unspread_percent"] == 19.0  # Pad's 9.5 of the 50 ms at two threads; Cast sped up 4x
