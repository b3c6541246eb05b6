"""Nothing lost: a checkpoint is a step every block saved, through kills, full disks and diverging runs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgebll.checkpoints import PROGRESS_NAME, check_disk_room, checkpoint_bytes
from edgebll.data import Dataset
from edgebll.dataset_folder import write_dataset_folder
from edgebll.errors import DiskFullError, EdgeBLLError, TrainingError
from edgebll.manifest import load_block_manifest
from edgebll.runtime import Runtime

KILL_TRIALS = 8
"""Kills per test run (each one a fresh uninterrupted-vs-killed comparison); benchmarks/kill_resume.py runs more."""


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def weights(run: Path) -> dict[str, np.ndarray]:
    runtime = Runtime.from_run(run, threads=1)
    return {f"{r.block_dir.name}/{name}": value for r in runtime.all_runners for name, value in r.parameters().items()}


def assert_same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def train_cli(run: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgebll", "train", str(run), "--data", str(data), "--epochs", "2",
            "--checkpoint-every", "1", "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = synthetic(480)
    tx, ty = synthetic(32, seed=1)
    return write_dataset_folder(tmp_path_factory.mktemp("data") / "noise", {"train": (x, y), "test": (tx, ty)},
                                num_classes=10)


def marked_step(run: Path) -> int:
    try:
        return json.loads((run / PROGRESS_NAME).read_text())["step"]
    except (OSError, ValueError):
        return -1


def kill_during_training(cmd: list[str], run: Path, step: int, delay: float) -> int:
    """Start ``cmd``; ``delay`` s after it has checkpointed ``step`` (progress.json), SIGKILL it. Returns its code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and marked_step(run) < step:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_weights(
        tiny_run: Path, kill_data: Path, tmp_path: Path) -> None:
    """The CLI in a subprocess, SIGKILLed at random moments of its training (after a random step, a random
    part of a step later: inside a step, or a checkpoint, between two blocks' saves), then resumed: every
    trial's weights equal the uninterrupted run's byte for byte, and train.json covers every epoch whole."""
    straight = Path(shutil.copytree(tiny_run, tmp_path / "straight"))
    began = time.monotonic()
    done = subprocess.run(train_cli(straight, kill_data), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    total = json.loads((straight / "train.json").read_text())["steps"]
    step_s = (time.monotonic() - began) / total  # an upper bound: startup counts in
    expected = weights(straight)
    expected_epochs = json.loads((straight / "train.json").read_text())["epochs"]
    seed = int(time.time())
    rng = np.random.default_rng(seed)  # random moments; a failure names the seed
    for trial in range(KILL_TRIALS):
        run = Path(shutil.copytree(tiny_run, tmp_path / f"killed-{trial}"))
        step, delay = int(rng.integers(1, total - 2)), float(rng.uniform(0, step_s))
        why = f"trial {trial} (seed {seed}: killed {delay * 1000:.0f} ms after step {step})"
        assert kill_during_training(train_cli(run, kill_data), run, step, delay) == -signal.SIGKILL, why
        resumed = subprocess.run(train_cli(run, kill_data, "--resume"), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, f"{why}: {resumed.stderr}"
        assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".restore"))], why
        assert_same_bytes(expected, weights(run))
        epochs = json.loads((run / "train.json").read_text())["epochs"]
        assert [e["samples"] for e in epochs] == [e["samples"] for e in expected_epochs] == [480, 480], why
        assert [e["loss"] for e in epochs] == [e["loss"] for e in expected_epochs], why


def noise(n: int) -> Dataset:
    x, y = synthetic(n)
    return Dataset(x.astype(np.float32) / 255, y)


def before_save(runner: Any, step: int, action: Callable[[], None]) -> None:
    """Make ``runner`` call ``action`` when it is about to save ``step``."""
    original = runner.save

    def save(*, epoch: int) -> Path:
        if runner.progress["step"] == step:
            action()
        return original(epoch=epoch)

    runner.save = save


def power_lost() -> None:
    raise KeyboardInterrupt


def no_space() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def mixed_steps(tiny_run: Path, tmp_path: Path) -> tuple[Path, Dataset]:
    """A run whose block 0 saved step 6 while blocks 1-2 still hold step 5 (power lost during a save)."""
    data = noise(64)
    run = Path(shutil.copytree(tiny_run, tmp_path / "mixed"))
    runtime = Runtime.from_run(run, threads=1)
    before_save(runtime.runners[1], 6, power_lost)
    with pytest.raises(KeyboardInterrupt):
        runtime.train(data=data, epochs=2, checkpoint_every=1, progress=False)
    return run, data


def test_a_run_that_stopped_inside_its_first_checkpoint_says_nothing_complete_is_lost(tiny_run: Path,
                                                                                    tmp_path: Path) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "first"))
    runtime = Runtime.from_run(run, threads=1)
    before_save(runtime.runners[1], 2, power_lost)
    with pytest.raises(KeyboardInterrupt):
        runtime.train(data=noise(64), epochs=1, checkpoint_every=2, progress=False)
    assert not (run / PROGRESS_NAME).exists()
    with pytest.raises(EdgeBLLError, match=r"blocks stopped at different steps \[0, 2\] and no step was saved by every "
                                           r"block \(progress.json is missing\).*hint: --restart \(it loses no "
                                           r"complete checkpoint\)"):
        Runtime.from_run(run, threads=1).train(data=noise(64), epochs=1, resume=True, progress=False)


def test_blocks_saved_at_different_steps_go_back_to_the_common_one(tiny_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, data = mixed_steps(tiny_run, tmp_path)
    assert json.loads((run / "block-0" / "trained" / "checkpoint.json").read_text())["step"] == 6
    assert json.loads((run / PROGRESS_NAME).read_text())["step"] == 5
    evaluation = Runtime.from_run(run, threads=1).evaluate(data=data, progress=False)
    assert evaluation["trained_step"] == 5
    assert "using step 5, the last step every block saved" in capsys.readouterr().err
    straight = Path(shutil.copytree(tiny_run, tmp_path / "straight"))
    Runtime.from_run(straight, threads=1).train(data=data, epochs=2, progress=False)
    summary = Runtime.from_run(run, threads=1).train(data=data, epochs=2, resume=True, progress=False)
    assert summary["steps"] == 8 and [e["samples"] for e in summary["epochs"]] == [64, 64]
    assert_same_bytes(weights(straight), weights(run))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real full disk (needs root, as on CI; elsewhere the injected test below covers it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        free = shutil.disk_usage(disk).free
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_run: Path, small_disk: Path) -> None:
    data = noise(64)
    run = Path(shutil.copytree(tiny_run, small_disk / "run"))
    runtime = Runtime.from_run(run, threads=1)
    before_save(runtime.runners[1], 3, lambda: fill(small_disk, 0))  # someone else's logs took the rest of the card
    with pytest.raises(DiskFullError, match=r"block-1/trained/checkpoint: the disk is full \(0\.0 MiB free; "
                                            r"writing this file needs about .* MiB\); the run's checkpoint of "
                                            r"step 2 stays complete .* hint: free space on that disk"):
        runtime.train(data=data, epochs=1, checkpoint_every=1, progress=False)
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".restore"))]
    (small_disk / "filler").unlink()
    resumed = Runtime.from_run(run, threads=1)
    assert {r.progress["step"] for r in resumed.all_runners} == {2}
    assert resumed.train(data=data, epochs=1, resume=True, progress=False)["steps"] == 4


def test_training_refuses_to_start_without_room_for_one_more_checkpoint(tiny_run: Path, small_disk: Path) -> None:
    run = Path(shutil.copytree(tiny_run, small_disk / "run"))
    fill(small_disk, 16 << 10)
    x, y = synthetic(32)
    with pytest.raises(DiskFullError, match="one more checkpoint of the run needs .* MiB free, the disk has"):
        Runtime.from_run(run, threads=1).train(data=Dataset(x.astype(np.float32), y), progress=False)
    assert not (run / "block-0" / "trained").exists()


def test_an_injected_write_failure_at_every_save_point_keeps_the_last_checkpoint(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: "no space left" raised by each block's save in turn, and by progress.json."""
    import edgebll.checkpoints as checkpoints

    data = noise(64)
    for point in ("block-0", "block-1", "block-2", PROGRESS_NAME):
        run = Path(shutil.copytree(tiny_run, tmp_path / point.replace(".", "-")))
        runtime = Runtime.from_run(run, threads=1)
        if point == PROGRESS_NAME:
            real = checkpoints.write_json_atomic

            def no_room(path: Path, text: str) -> None:
                if Path(path).name == PROGRESS_NAME and '"step": 3' in text:
                    no_space()
                real(path, text)

            monkeypatch.setattr(checkpoints, "write_json_atomic", no_room)
        else:
            before_save(runtime.runners[int(point[-1])], 3, no_space)
        with pytest.raises(DiskFullError, match="step 2 stays complete"):
            runtime.train(data=data, epochs=1, checkpoint_every=1, progress=False)
        monkeypatch.undo()
        assert {r.progress["step"] for r in Runtime.from_run(run, threads=1).all_runners} == {2}, point


def test_weights_that_turn_non_finite_are_never_checkpointed(tiny_run: Path, tmp_path: Path) -> None:
    data = noise(64)
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    runtime = Runtime.from_run(run, threads=1)
    runtime.train(data=data, epochs=1, checkpoint_every=2, progress=False)
    poisoned = Runtime.from_run(run, threads=1)
    block = poisoned.runners[2]
    name = next(iter(block.parameters()))
    original = block.parameters

    def with_nan() -> dict[str, np.ndarray]:
        params = original()
        params[name] = params[name] * np.nan
        return params

    block.parameters = with_nan  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match=rf"block 2: weight {name} is not finite after step 6; nothing was saved "
                                            r"at this step and the run's checkpoint of step 4 stays complete"):
        poisoned.train(data=data, epochs=2, resume=True, checkpoint_every=2, progress=False)
    assert json.loads((run / PROGRESS_NAME).read_text())["step"] == 4


def test_finite_weights_that_send_non_finite_messages_are_never_checkpointed(tiny_portable_run: Path,
                                                                               tmp_path: Path) -> None:
    """A step's outputs come from the weights before its update: the checkpoint probes the updated weights on the
    last batch, so weights that are finite but overflow the next message are refused too."""
    run = Path(shutil.copytree(tiny_portable_run, tmp_path / "run"))
    runtime = Runtime.from_run(run, threads=1, backend="portable")
    runtime.train(data=noise(32), epochs=1, progress=False)
    assert json.loads((run / PROGRESS_NAME).read_text())["step"] == 4
    for runner in runtime.runners:
        arrays = runner.state_arrays()
        if runner.index == 0:  # a huge but finite first convolution: its output overflows float32
            key = next(k for k in arrays if k.startswith("param:") and arrays[k].ndim == 4)
            arrays[key] = np.full_like(arrays[key], 1e38)
        runner.load_state_arrays(arrays, 5)
    assert all(np.isfinite(v).all() for r in runtime.runners for v in r.parameters().values())
    with pytest.raises(TrainingError, match=r"block 0: its weights after step 5 give a non-finite message and logits "
                                            r"on the last batch; nothing was saved at this step and the run's "
                                            r"checkpoint of step 4 stays complete"):
        runtime.save(epoch=1)
    assert json.loads((run / PROGRESS_NAME).read_text())["step"] == 4
    assert {r.progress["step"] for r in Runtime.from_run(run, threads=1, backend="portable").runners} == {4}


def test_a_fresh_run_asks_room_for_its_optimizers_state(tiny_run: Path, tiny_portable_run: Path) -> None:
    """Before the first save, one checkpoint is the weights plus the optimizer's moments: AdamW's two, SGD's none."""
    adamw, sgd = (load_block_manifest(run / "block-0") for run in (tiny_run, tiny_portable_run))
    assert (adamw.optimizer["type"], sgd.optimizer["type"]) == ("adamw", "sgd")
    assert checkpoint_bytes(adamw, tiny_run / "block-0") == adamw.num_parameters * 12 + (256 << 10)
    assert checkpoint_bytes(sgd, tiny_portable_run / "block-0") == sgd.num_parameters * 4 + (256 << 10)


def test_the_disk_check_names_what_is_needed(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    check_disk_room(tmp_path, free // 2)
    with pytest.raises(DiskFullError, match=rf"{tmp_path}: one more checkpoint of the run needs"):
        check_disk_room(tmp_path, free * 2)
