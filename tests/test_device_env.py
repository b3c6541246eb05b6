"""The device runtime trains in an environment without torch (numpy + onnxruntime-training only)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"

SCRIPT = """
import importlib.util, json, sys
sys.path.insert(0, {repo!r})
assert importlib.util.find_spec("torch") is None, "torch is installed in the device venv"
import numpy as np
from edgebll.data import Dataset
from edgebll.runtime import Runtime
rng = np.random.default_rng(0)
data = Dataset(rng.standard_normal((64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int64))
runtime = Runtime.from_run({run!r}, load_trained=False)
summary = runtime.train(data=data, epochs=2, codec="int8", progress=False)
evaluation = runtime.evaluate(data=data, progress=False)
print(json.dumps({{"torch_loaded": "torch" in sys.modules, "steps": summary["steps"],
                  "loss": summary["epochs"][-1]["loss"], "first_loss": summary["epochs"][0]["loss"],
                  "accuracy": evaluation["per_block_accuracy"]}}))
"""


def test_runtime_trains_without_torch(run_copy: Path) -> None:
    if not DEVICE_PYTHON.exists():
        message = f"{DEVICE_PYTHON} missing; `make test` creates it (numpy + onnxruntime-training, no torch)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([str(DEVICE_PYTHON), "-c", SCRIPT.format(repo=str(REPO), run=str(run_copy))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False
    assert result["steps"] == 2 * 4  # 64 samples / batch 16, two epochs
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"]) and len(result["accuracy"]) == 3
    # it learned something: the local losses went down on the (memorisable) training data
    assert all(after < before for after, before in zip(result["loss"], result["first_loss"]))
