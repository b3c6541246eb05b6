"""The artifact contract: every way a block folder can be wrong is refused with a message that says what and where."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebll.errors import EdgeBLLError, ManifestError, TrainingError
from edgebll.manifest import FORMAT_VERSION, load_block_manifest
from edgebll.run_folder import load_run_config
from edgebll.runner import BlockRunner
from edgebll.runtime import Runtime


def edit_manifest(block_dir: Path, **changes: object) -> None:
    path = block_dir / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_manifest_describes_the_block(tiny_run: Path) -> None:
    m = load_block_manifest(tiny_run / "block-1")
    assert (m.index, m.num_blocks, m.method, m.format_version) == (1, 3, "bwbpf", FORMAT_VERSION)
    assert [(t.name, t.shape, t.dtype, t.role) for t in m.inputs] == [
        ("x", ["batch", 4, 28, 28], "float32", "message"), ("labels", ["batch"], "int64", "labels")]
    assert m.output("message").shape == ["batch", 8, 14, 14]
    assert m.output("logits").shape == ["batch", 10]
    # BatchNorm statistics to write back: the body's (14x14) and the conv head's. The head would cost more
    # than this one-conv block (56,608 vs 56,448 MACs), so it reads the map in 2x2 tiles: 7x7, then 4x4 after stride 2
    assert sorted((s.parameter, s.kind, s.spatial) for s in m.bn_stats) == [
        ("body.0.1.running_mean", "mean", 14 * 14), ("body.0.1.running_var", "var", 14 * 14),
        ("head.head.bn.running_mean", "mean", 4 * 4), ("head.head.bn.running_var", "var", 4 * 4)]
    assert set(m.files) == {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"}
    assert m.optimizer["type"] == "adamw" and m.batch_size == 16 and m.estimated_peak_bytes > 0
    assert load_block_manifest(tiny_run / "block-2").output("message") is None  # the last block sends nothing
    run = load_run_config(tiny_run)
    assert run.blocks == 3 and run.lr == 0.01 and run.model == "custom" and run.is_bll is False


def test_modified_file_is_refused(run_copy: Path) -> None:
    path = run_copy / "block-1" / "eval_model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: the sha256 finds it
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"block 1 .*eval_model.onnx has sha256 .* modified or corrupted"):
        BlockRunner(run_copy / "block-1")


def test_a_file_of_another_size_is_refused_before_it_is_read(run_copy: Path) -> None:
    """A huge (sparse) file put in place of an artifact would take minutes to hash: its size gives it away."""
    with open(run_copy / "block-1" / "checkpoint", "r+b") as f:
        f.truncate(50 << 30)  # 50 GiB, sparse: no disk used
    with pytest.raises(ManifestError, match=r"block 1 .*checkpoint has 53687091200 bytes but the manifest says \d+; "
                                            r"the file was replaced or truncated"):
        BlockRunner(run_copy / "block-1")  # (hashing it first would have said "has sha256 …", after minutes)


def test_missing_file_is_refused(run_copy: Path) -> None:
    (run_copy / "block-0" / "optimizer_model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"block 0 .*'optimizer_model.onnx' is missing"):
        Runtime.from_run(run_copy)


def test_missing_manifest_is_refused(run_copy: Path) -> None:
    (run_copy / "block-2" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"block-2/manifest.json: missing"):
        Runtime.from_run(run_copy)


def test_newer_format_is_refused(run_copy: Path) -> None:
    edit_manifest(run_copy / "block-0", format_version=FORMAT_VERSION + 1)
    with pytest.raises(ManifestError, match=rf"format version {FORMAT_VERSION + 1} is newer .* upgrade edgebll"):
        BlockRunner(run_copy / "block-0")


def test_unknown_key_is_refused(run_copy: Path) -> None:
    edit_manifest(run_copy / "block-0", colour="blue")
    with pytest.raises(ManifestError, match=r"block-0/manifest.json: unknown key\(s\) \['colour'\]; a block manifest has"):
        BlockRunner(run_copy / "block-0")


def test_chain_mismatch_is_refused(run_copy: Path) -> None:
    path = run_copy / "block-2" / "manifest.json"
    data = json.loads(path.read_text())
    data["inputs"][0]["shape"] = ["batch", 16, 14, 14]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"block 2 .*input 'x' has shape \[16, 14, 14\] .* previous block sends "
                                            r"\[8, 14, 14\].*re-export both blocks"):
        Runtime.from_run(run_copy)


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"run.json: missing; .* is not an exported run"):
        Runtime.from_run(tmp_path)


@pytest.mark.parametrize("x, labels, match", [
    (np.zeros((4, 4, 28, 28), np.float32), np.zeros(4, np.int64), r"block 0 .*input 'x' has shape \[4, 4, 28, 28\] "
                                                                   r"but the block takes \[4, 1, 28, 28\]"),
    (np.zeros((4, 1, 28, 28), np.float64), np.zeros(4, np.int64), r"input 'x' has dtype float64, expected float32"),
    (np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int32), r"input 'labels' has dtype int32, expected int64"),
    (np.zeros((4, 1, 28, 28), np.float32), np.zeros(3, np.int64), r"input 'labels' has shape \[3\] but the block "
                                                                   r"takes \[4\]"),
])
def test_bad_inputs_are_refused(tiny_run: Path, x: np.ndarray, labels: np.ndarray, match: str) -> None:
    runner = BlockRunner(tiny_run / "block-0", load_trained=False)
    with pytest.raises(TrainingError, match=match):
        runner.train_step(x, labels, 0.01)
    assert issubclass(TrainingError, EdgeBLLError)


def test_non_finite_loss_stops_before_the_update(tiny_run: Path) -> None:
    runner = BlockRunner(tiny_run / "block-0", load_trained=False)
    before = runner.parameters()
    x = np.full((4, 1, 28, 28), np.inf, np.float32)
    with pytest.raises(TrainingError, match=r"block 0: local loss is nan at step 0 .*before the optimizer step"):
        runner.train_step(x, np.zeros(4, np.int64), 0.01)
    after = runner.parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), r"file name '\.\./\.\./etc/passwd' is not a plain name"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), r"file name '/etc/passwd' is not a plain name"),
    (lambda m: m["files"].update({"sub/x": "0" * 64}), r"file name 'sub/x' is not a plain name"),
    (lambda m: m["files"].update({"x": "not-a-digest"}), r"the sha256 of 'x' is not 64 hex digits"),
    (lambda m: m.update(files=["eval_model.onnx"]), r"manifest.json: files must be dict\[str, str\], got list"),
])
def test_hostile_manifests_are_refused_before_any_file_is_read(run_copy: Path, edit, match: str) -> None:
    path = run_copy / "block-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=match):
        load_block_manifest(run_copy / "block-0")


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", r"holds a JSON list, not an object"),
    ("null", r"holds a JSON NoneType, not an object"),
    ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(RecursionError"),
])
def test_manifests_that_are_not_objects_are_refused(run_copy: Path, text: str, match: str) -> None:
    (run_copy / "block-0" / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=match):
        load_block_manifest(run_copy / "block-0")


def test_a_linked_artifact_is_refused(run_copy: Path, tmp_path: Path) -> None:
    block = run_copy / "block-0"
    outside = tmp_path / "outside.onnx"
    (block / "eval_model.onnx").rename(outside)
    (block / "eval_model.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match=r"eval_model.onnx is a symbolic link"):
        load_block_manifest(block)


@pytest.mark.parametrize("edit, match", [
    (lambda c: {}, r"'blocks' must be an integer >= 1, got None"),
    (lambda c: None, r"holds a JSON NoneType, not an object"),
    (lambda c: c | {"blocks": "3"}, r"'blocks' must be an integer >= 1, got '3'"),
    (lambda c: c | {"blocks": 2.5}, r"'blocks' must be an integer >= 1, got 2.5"),
    (lambda c: c | {"blocks": 0}, r"'blocks' must be an integer >= 1, got 0"),
    (lambda c: c | {"blocks": -1}, r"'blocks' must be an integer >= 1, got -1"),
    (lambda c: c | {"batch_size": 0}, r"'batch_size' must be an integer >= 1, got 0"),
    (lambda c: c | {"lr": float("inf")}, r"'lr' must be a finite number > 0, got inf"),
    (lambda c: c | {"method": "magic"}, r"'method' must be one of"),
    (lambda c: c | {"data": "fashion-mnist"}, r"'data' must be an object naming the dataset"),
    # every other key by the one strict loader of manifests, run.json and device profiles
    (lambda c: c | {"colour": "blue"}, r"run.json: unknown key\(s\) \['colour'\]; run.json has \["),
    (lambda c: c | {"seed": "7"}, r"run.json: seed must be int, got str \('7'\)"),
    (lambda c: c | {"units": [["a"], "b"]}, r"run.json: units\[1\] must be list\[str\], got str"),
    (lambda c: c | {"input_shape": [1, 28.5, 28]}, r"run.json: input_shape\[1\] must be int, got float"),
    (lambda c: c | {"format_version": 2}, r"format version 2 is newer than this runtime supports \(1\)"),
])
def test_broken_run_configs_are_refused_naming_the_key(run_copy: Path, edit, match: str) -> None:
    path = run_copy / "run.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ManifestError, match=match):
        Runtime.from_run(run_copy)


def test_run_json_and_manifests_must_agree_on_the_batch_size(run_copy: Path) -> None:
    path = run_copy / "run.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"batch_size": config["batch_size"] * 2}))
    with pytest.raises(ManifestError, match=r"run.json's batch_size \d+ differs from the manifests' \[\d+\]"):
        Runtime.from_run(run_copy)
