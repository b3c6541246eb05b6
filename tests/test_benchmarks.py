"""Every benchmark script starts: its imports resolve and its --help explains it (they run for hours, not here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
