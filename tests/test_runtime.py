"""The in-process runtime: messages through the codec, crash-safe checkpoints, exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgebll.codec import decode
from edgebll.data import Dataset
from edgebll.errors import EdgeBLLError, TrainingError
from edgebll.runner import BlockRunner
from edgebll.runtime import Runtime, TrainConfig, encode_message


def synthetic(n: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))


def weights(run: Path) -> dict[str, np.ndarray]:
    return {f"{k}/{name}": value for k in range(3)
            for name, value in BlockRunner(run / f"block-{k}").parameters().items()}


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    data = synthetic()
    straight = Path(shutil.copytree(tiny_run, tmp_path / "straight"))
    Runtime.from_run(straight, threads=1).train(data=data, epochs=2, progress=False)

    crashed = Path(shutil.copytree(tiny_run, tmp_path / "crashed"))
    runtime = Runtime.from_run(crashed, threads=1)
    calls = {"n": 0}
    original = runtime.runners[2].train_step

    def dies_at_sixth_step(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # the board lost power in epoch 2, step 2
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime.runners[2], "train_step", dies_at_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        runtime.train(data=data, epochs=2, checkpoint_every=1, progress=False)
    resumed = Runtime.from_run(crashed, threads=1)
    assert {r.progress["step"] for r in resumed.runners} == {5}  # blocks 0-1 ran step 6, but never saved it
    summary = resumed.train(data=data, epochs=2, resume=True, progress=False)
    assert summary["steps"] == 8 and summary["samples"] == 3 * 16  # exactly the 3 batches not yet trained
    a, b = weights(straight), weights(crashed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def test_messages_are_counted_as_encoded_frames(run_copy: Path) -> None:
    from edgebll.codec import frame_nbytes

    runtime = Runtime.from_run(run_copy)
    summary = runtime.train(data=synthetic(32), epochs=1, codec="int8", progress=False)
    expected = [frame_nbytes((16, 4, 28, 28), "int8"), frame_nbytes((16, 8, 14, 14), "int8")]
    assert summary["message_bytes_per_step"] == expected
    assert summary["message_bytes_per_sample"] == pytest.approx(sum(expected) / 16)
    assert json.loads((run_copy / "train.json").read_text())["codec"] == "int8"


def test_codec_choice_changes_what_the_next_block_sees(run_copy: Path) -> None:
    """fp32 messages are exact; int8 ones differ from them by at most half a quantisation step."""
    runtime = Runtime.from_run(run_copy, load_trained=False)
    x = synthetic(16).images
    labels = np.zeros(16, np.int64)
    message = runtime.runners[0].eval_step(x, labels).message
    frames = {codec: encode_message(message, TrainConfig(codec=codec), 0, 0) for codec in ("fp32", "int8")}
    exact, rough, nbytes = decode(frames["fp32"]), decode(frames["int8"]), len(frames["int8"])
    np.testing.assert_array_equal(exact, message)
    scale = np.abs(message).max() / 127
    assert 0 < np.abs(rough - message).max() <= scale / 2 + 1e-7
    assert nbytes < message.nbytes / 3.9


@pytest.mark.parametrize("feedback, sender, match", [
    (False, None, r"^block 1, step 7: cannot send its activation: .*non-finite"),
    (True, None, r"^feedback block 1, step 7: cannot send its beta message: .*non-finite"),
    (False, "rank 1 (block 1)", r"^rank 1 \(block 1\), step 7: cannot send its activation: .*non-finite"),
])
def test_non_finite_message_names_sender_and_step(feedback: bool, sender: str | None, match: str) -> None:
    """Every transport encodes through encode_message, so a bad message is reported alike in process and over MPI."""
    bad = np.full((2, 4, 28, 28), np.nan, np.float32)
    with pytest.raises(TrainingError, match=match):
        encode_message(bad, TrainConfig(codec="int8"), 7, 1, feedback=feedback, sender=sender)


@pytest.mark.parametrize("overrides, match", [
    (dict(epochs=0), r"--epochs must be at least 1"), (dict(codec="int3"), r"unknown codec 'int3'"),
    (dict(lr=-1.0), r"--lr must be a finite number > 0"), (dict(schedule="wavy"), r"unknown schedule 'wavy'"),
])
def test_bad_train_options(tiny_run: Path, overrides: dict, match: str) -> None:
    with pytest.raises(EdgeBLLError, match=match):
        Runtime.from_run(tiny_run, load_trained=False).train(data=synthetic(32), progress=False, **overrides)


def test_learning_rate_schedules() -> None:
    from edgebll.schedule import learning_rate

    assert learning_rate("cosine", 1.0, 0, 100) == 1.0
    assert learning_rate("cosine", 1.0, 50, 100) == pytest.approx(0.5)
    assert learning_rate("cosine", 1.0, 100, 100) == pytest.approx(0.0)
    assert [learning_rate("step", 1.0, s, 100) for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])
    assert learning_rate("constant", 0.3, 99, 100) == 0.3
    assert [learning_rate("cosine", 1.0, s, 100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(EdgeBLLError, match="unknown learning-rate schedule 'wavy'"):
        learning_rate("wavy", 1.0, 0, 1)


@pytest.fixture(scope="module")
def bll_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from torch import nn

    from edgebll.export import export_model
    from edgebll.export.models import conv_bn_relu

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)), nn.Sequential(*conv_bn_relu(8, 8, 2))]
    return export_model(units, method="bll", out=tmp_path_factory.mktemp("bll") / "run", blocks=3, batch_size=16,
                        lr=0.01, progress=False, portable=False)


def test_bll_run_layout(bll_run: Path) -> None:
    from edgebll.manifest import load_block_manifest
    from edgebll.run_folder import load_run_config

    assert load_run_config(bll_run).latent == "categorical"
    for k in range(2):
        forward, feedback = load_block_manifest(bll_run / f"block-{k}"), load_block_manifest(bll_run / f"block-{k}/feedback")
        assert (forward.kind, feedback.kind, feedback.index) == ("forward", "feedback", k)
        assert [t.role for t in forward.inputs] == ["message", "prior"] and forward.output("metric").name == "kl"
        assert [t.role for t in feedback.inputs] == ["message", "target"]
    last = load_block_manifest(bll_run / "block-2")
    assert [t.role for t in last.inputs] == ["message", "labels"]  # the top block's posterior is the target itself
    assert not (bll_run / "block-2" / "feedback").exists()


def test_bll_trains_both_networks_and_sends_beta_down(bll_run: Path, tmp_path: Path) -> None:
    import shutil

    from edgebll.codec import frame_nbytes

    run = Path(shutil.copytree(bll_run, tmp_path / "run"))
    runtime = Runtime.from_run(run, threads=1)
    before = {r.name: r.parameters() for r in runtime.all_runners}
    summary = runtime.train(data=synthetic(64), epochs=3, codec="int8", progress=False)
    assert len(runtime.feedback) == 2 and summary["steps"] == 12
    for r in runtime.all_runners:  # every forward and feedback block took its own local steps
        after = r.parameters()
        assert any(not np.array_equal(before[r.name][n], after[n]) for n in after), r.name
    # beta travels down once per step, from feedback block 1 to device 0: an int8 frame of [16, 10]
    assert summary["feedback_bytes_per_step"] == [frame_nbytes((16, 10), "int8")]
    epochs = summary["epochs"]
    assert len(epochs[-1]["kl"]) == 2 and all(np.isfinite(epochs[-1]["kl"]))
    # the feedback read-out learns the target: its cross-entropy falls
    assert all(late < early for late, early in zip(epochs[-1]["feedback_loss"], epochs[0]["feedback_loss"]))
    evaluation = runtime.evaluate(data=synthetic(32), progress=False)  # the forward chain alone
    assert len(evaluation["per_block_accuracy"]) == 3
    resumed = Runtime.from_run(run)
    assert {r.progress["step"] for r in resumed.all_runners} == {12}


def test_bll_needs_two_blocks(tmp_path: Path) -> None:
    from edgebll.errors import ExportError
    from edgebll.export import export_model

    with pytest.raises(ExportError, match=r"--method bll needs at least 2 blocks"):
        export_model("cnn-small", method="bll", blocks=1, out=tmp_path / "r", progress=False, portable=False)


@pytest.mark.parametrize("cut_at", ["trained/checkpoint", "trained/checkpoint.json"])
def test_a_save_interrupted_between_its_two_files_leaves_a_complete_pair(run_copy: Path, cut_at: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import edgebll.runner as runner_module

    data = synthetic(32)
    Runtime.from_run(run_copy, threads=1).train(data=data, epochs=1, progress=False)  # saved: step 2
    runner = BlockRunner(run_copy / "block-1", threads=1)
    before = runner.parameters()
    runner.train_step(np.zeros((16, 4, 28, 28), np.float32), np.zeros(16, np.int64), 0.5)
    real_replace = os.replace

    def power_cut(src: object, dst: object) -> None:
        if str(dst).endswith(cut_at):
            raise KeyboardInterrupt  # the power goes before this file is in place
        real_replace(src, dst)

    import edgebll.json_files as json_files_module

    monkeypatch.setattr(runner_module.os, "replace", power_cut)
    monkeypatch.setattr(json_files_module.os, "replace", power_cut)  # the sidecar's atomic write
    with pytest.raises(KeyboardInterrupt):
        runner.save(epoch=1)
    monkeypatch.undo()
    reloaded = BlockRunner(run_copy / "block-1", threads=1)
    assert reloaded.progress == {"epoch": 1, "step": 2}  # the old checkpoint, with its own progress
    for name, value in before.items():
        np.testing.assert_array_equal(reloaded.parameters()[name], value, err_msg=name)
    reloaded.save(epoch=1)  # and the next save completes normally
    assert BlockRunner(run_copy / "block-1", threads=1).progress == {"epoch": 1, "step": 2}


@pytest.mark.parametrize("bad, message", [(10, r"sample 3 has label 10, but the run has 10 classes \(0\.\.9\)"),
                                          (-1, r"sample 3 has label -1, but the run has 10 classes")])
def test_labels_outside_the_runs_classes_are_refused_before_the_first_step(run_copy: Path, bad: int,
                                                                           message: str) -> None:
    from edgebll.errors import DataError

    data = synthetic(32)
    data.labels[3] = bad
    runtime = Runtime.from_run(run_copy, threads=1)
    with pytest.raises(DataError, match=r"training data: " + message):
        runtime.train(data=data, epochs=1, progress=False)
    with pytest.raises(DataError, match=r"test data: " + message):
        runtime.evaluate(data=data, progress=False)
    assert not (run_copy / "block-0" / "trained").exists()  # nothing trained, nothing saved


def test_arrays_of_any_sample_shape_train_from_python(run_copy: Path) -> None:
    """ArrayDataset takes what Dataset (images [N, C, H, W]) does not; a shape the run cannot take is refused."""
    from edgebll import ArrayDataset
    from edgebll.errors import DataError

    rng = np.random.default_rng(0)
    flat = ArrayDataset(rng.standard_normal((32, 784)).astype(np.float32), rng.integers(0, 10, 32))
    with pytest.raises(DataError, match=r"samples are float32 \[784\], but the run's first block takes float32 \[1, 28, 28\]"):
        Runtime.from_run(run_copy, threads=1).train(data=flat, epochs=1, progress=False)
    images = ArrayDataset(flat.inputs.reshape(32, 1, 28, 28), flat.labels.astype(np.int64))
    summary = Runtime.from_run(run_copy, threads=1).train(data=images, epochs=1, progress=False)
    assert summary["steps"] > 0


@pytest.mark.parametrize("option, value, message", [
    ("lr", float("inf"), r"--lr must be a finite number > 0, got inf"),
    ("lr", float("nan"), r"--lr must be a finite number > 0, got nan"),
    ("lr", -1.0, r"--lr must be a finite number > 0, got -1.0"),
    ("seed", -1, r"--seed must be >= 0, got -1"),
    ("warmup_steps", -10, r"--warmup-steps must be >= 0, got -10"),
    ("checkpoint_every", -1, r"--checkpoint-every must be >= 0, got -1"),
    ("limit", 0, r"--limit must be at least 1, got 0"),
    ("feedback_lr_scale", float("inf"), r"--feedback-lr-scale must be a finite number > 0"),
    ("mix_start", float("nan"), r"BLL mixing weights must be >= 0"),
])
def test_absurd_training_options_are_refused_up_front(option: str, value: float, message: str) -> None:
    config = TrainConfig(**{option: value})
    with pytest.raises(EdgeBLLError, match=message):
        config.validate()


def test_negative_threads_are_refused(run_copy: Path) -> None:
    with pytest.raises(EdgeBLLError, match=r"--threads must be >= 0 \(0: onnxruntime decides\), got -3"):
        Runtime.from_run(run_copy, threads=-3)
