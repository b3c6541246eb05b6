"""Memory estimate (edgebll.memory), measurement (edgebll.profiler), `edgebll profile`, and the memory cap."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgebll import codec
from edgebll.cli import main
from edgebll.errors import EdgeBLLError, MemoryCapError
from edgebll.manifest import load_block_manifest
from edgebll.memory import ARENA_OVERHEAD, PATTERN_COPY, RUNTIME_BYTES, RUNTIME_SPREAD, MemoryEstimate, estimate_peak_bytes
from edgebll.profile_child import OOM_EXIT, random_inputs
from edgebll.profiler import address_space_cap, measure_baseline, measure_block
from edgebll.run_folder import block_dirs
from edgebll.runner import BlockRunner

TARGET = 0.25
"""The bound: every block's estimate within 25 % of its measured peak, give or take the spread of ORT's
own memory from one CPU to another (RUNTIME_SPREAD), which is most of a tiny block."""


def assert_within_target(estimate: MemoryEstimate | dict, measured: int, what: object) -> None:
    total, runtime = ((estimate["total"], estimate["runtime"]) if isinstance(estimate, dict)
                      else (estimate.total, estimate.runtime))
    allowed = TARGET * measured + RUNTIME_SPREAD * runtime
    assert abs(total - measured) <= allowed, f"{what}: estimated {total}, measured {measured}, allowed ±{allowed:.0f}"


def _units(channels: int) -> list:
    from edgebll.export.models import conv_bn_relu
    from torch import nn

    return [nn.Sequential(*conv_bn_relu(1, channels)), nn.Sequential(*conv_bn_relu(channels, channels)),
            nn.Sequential(*conv_bn_relu(channels, channels, 2))]


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two blocks whose activations (not ORT's constant) dominate: 32 channels at 28x28, batch 64."""
    import torch
    from edgebll.export import export_model

    torch.manual_seed(0)
    return export_model(_units(32), out=tmp_path_factory.mktemp("runs") / "wide", blocks=2, batch_size=64,
                        progress=False)


@pytest.fixture(scope="module")
def tiny_bp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model of conftest's tiny_run trained whole (method bp)."""
    import torch
    from edgebll.export import export_model
    from edgebll.export.models import conv_bn_relu
    from torch import nn

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)),
             nn.Sequential(*conv_bn_relu(8, 8, 2))]
    return export_model(units, out=tmp_path_factory.mktemp("runs") / "tiny-bp", method="bp", blocks=1, batch_size=16,
                        lr=0.01, progress=False, portable=False)


@pytest.fixture(scope="module")
def tiny_bll_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as BLL: forward blocks with a prior input, feedback blocks in block-k/feedback."""
    import torch
    from edgebll.export import export_model

    torch.manual_seed(0)
    units = _units(4)
    return export_model(units, out=tmp_path_factory.mktemp("runs") / "tiny-bll", method="bll", blocks=3,
                        batch_size=16, lr=0.01, progress=False, portable=False)


@pytest.fixture(scope="module")
def baseline():  # type: ignore[no-untyped-def]
    return measure_baseline()


def test_estimate_parts_come_from_the_graph(tiny_run: Path) -> None:
    block = tiny_run / "block-1"
    manifest = load_block_manifest(block)
    batch = manifest.batch_size
    e = estimate_peak_bytes(block, memory_pattern=False, codec="int8", codec_backend="numpy")
    assert e.batch_size == batch and e.guessed_shapes == ()
    assert e.gradients == 4 * manifest.num_parameters  # every parameter trains
    statistics = sum(math.prod(t.shape) for t in manifest.outputs if t.role == "bn_stat")
    assert e.parameters == e.gradients + 4 * statistics  # weights and the BatchNorm running statistics
    assert e.optimizer_state == 2 * e.gradients  # AdamW: two moments
    x_in = manifest.input("message").per_sample_shape()
    y_out = manifest.output("message").per_sample_shape()
    expected_messages = (4 * batch * math.prod(x_in) + 8 * batch  # decoded input, int64 labels
                         + codec.frame_nbytes([batch, *x_in], "int8")  # the frame it arrived in
                         + codec.frame_nbytes([batch, *y_out], "int8") + 4 * batch * math.prod(y_out))  # out + scratch
    assert e.messages == expected_messages
    assert 0 < e.saved_for_backward < e.activations
    assert e.runtime == RUNTIME_BYTES and e.allocator == int(ARENA_OVERHEAD * e.activations)
    assert e.total == sum(e.parts().values())
    with_pattern = estimate_peak_bytes(block / "manifest.json", memory_pattern=True, codec_backend="numpy")
    assert with_pattern.allocator == int((ARENA_OVERHEAD + PATTERN_COPY) * e.activations)
    assert with_pattern.total - e.total == with_pattern.allocator - e.allocator
    # the exporter's way: the manifest in hand, before manifest.json exists
    assert estimate_peak_bytes(block, manifest=manifest, memory_pattern=False, codec_backend="numpy") == e


def test_activations_scale_with_the_batch_and_the_optimizer_counts(tiny_run: Path, tmp_path: Path) -> None:
    small = estimate_peak_bytes(tiny_run / "block-0", 16, memory_pattern=False)
    large = estimate_peak_bytes(tiny_run / "block-0", 64, memory_pattern=False)
    assert 3.8 < large.activations / small.activations <= 4.0  # all but a few per-channel tensors scale
    assert large.parameters == small.parameters and large.gradients == small.gradients

    import torch
    from edgebll.export import export_model

    torch.manual_seed(0)
    sgd = export_model(_units(4)[:1], out=tmp_path / "sgd", blocks=1, batch_size=16, optimizer="sgd", progress=False, portable=False)
    assert estimate_peak_bytes(sgd / "block-0").optimizer_state == 0
    with pytest.raises(EdgeBLLError, match="batch size must be at least 1"):
        estimate_peak_bytes(tiny_run / "block-0", 0)


@pytest.mark.slow
def test_estimate_within_25_percent_of_the_measurement(wide_run: Path, tiny_run: Path, baseline) -> None:  # type: ignore[no-untyped-def]
    blocks = [wide_run / "block-0", wide_run / "block-1", tiny_run / "block-0"]
    for block in blocks:
        estimate = estimate_peak_bytes(block)
        measured = measure_block(block, baseline, steps=4, threads=1)
        assert measured.step_ms > 0 and measured.peak_rss_bytes > baseline.rss_bytes
        assert_within_target(estimate, measured.measured_peak_bytes, block)
    # the estimate follows the activations: the wide block really is the one whose activations dominate
    assert estimate_peak_bytes(blocks[0]).activations > 4 * estimate_peak_bytes(blocks[2]).activations


@pytest.mark.slow
def test_portable_estimate_within_25_percent_of_the_measurement(wide_run: Path, tiny_portable_run: Path,
                                                                baseline) -> None:  # type: ignore[no-untyped-def]
    """The portable step's estimate (its own graph, PORTABLE_* constants) against PortableRunner measured."""
    for block in (wide_run / "block-0", wide_run / "block-1", tiny_portable_run / "block-1"):
        estimate = estimate_peak_bytes(block, backend="portable")
        measured = measure_block(block, baseline, steps=4, threads=1, backend="portable")
        assert_within_target(estimate, measured.measured_peak_bytes, block)
    assert estimate_peak_bytes(wide_run / "block-0", backend="portable").total > estimate_peak_bytes(
        wide_run / "block-0", 16, backend="portable").total


@pytest.mark.slow
def test_an_eval_step_at_the_training_batch_needs_less_than_a_training_step(wide_run: Path, tiny_bll_run: Path,
                                                                             baseline) -> None:  # type: ignore[no-untyped-def]
    """What `edgebll eval` and --val-split run (the eval graph, at the run's batch) fits where training fits;
    at 8x the batch it does not: the reason eval no longer takes 500-image batches."""
    block = wide_run / "block-0"
    train = measure_block(block, baseline, steps=3, threads=1)
    evaluated = measure_block(block, baseline, steps=3, threads=1, mode="eval")
    large = measure_block(block, baseline, steps=3, threads=1, mode="eval", batch_size=8 * 64)
    frozen = measure_block(block, baseline, steps=3, threads=1, mode="frozen")  # --freeze-blocks: no training state
    assert (train.mode, evaluated.mode, frozen.mode) == ("train", "eval", "frozen")
    assert evaluated.measured_peak_bytes < train.measured_peak_bytes < large.measured_peak_bytes
    assert frozen.measured_peak_bytes < evaluated.measured_peak_bytes  # not even the training graph is loaded
    with pytest.raises(EdgeBLLError, match="is a feedback block: only forward blocks are evaluated"):
        measure_block(tiny_bll_run / "block-0" / "feedback", baseline, steps=2, mode="eval")
    with pytest.raises(EdgeBLLError, match="mode must be 'train', 'eval' or 'frozen', got 'infer'"):
        measure_block(block, baseline, mode="infer")


@pytest.mark.slow
def test_bll_feedback_blocks_are_found_fed_and_estimated(tiny_bll_run: Path, baseline) -> None:  # type: ignore[no-untyped-def]
    folders = block_dirs(tiny_bll_run, feedback_after_each=True)
    assert [f.relative_to(tiny_bll_run).as_posix() for f in folders] == [
        "block-0", "block-0/feedback", "block-1", "block-1/feedback", "block-2"]
    feedback = load_block_manifest(folders[1])
    beta, target = random_inputs(feedback, 8)
    assert beta.dtype == np.float32 and (target.sum(axis=1) == 1).all()  # a one-hot target
    for folder in folders[:2]:
        estimate = estimate_peak_bytes(folder)
        measured = measure_block(folder, baseline, steps=3, threads=1)
        assert_within_target(estimate, measured.measured_peak_bytes, folder)
        # ORT's code pages: part of what the block costs, and what varies from CPU to CPU
        assert measured.file_backed_bytes is not None and 0 < measured.file_backed_bytes < measured.measured_peak_bytes


@pytest.mark.slow
def test_profile_command_writes_json_png_and_table(run_copy: Path, tiny_bp_run: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    code = main(["profile", str(run_copy), "--budget", "1GiB", "--cores", "2", "--steps", "3", "--threads", "1",
                 "--bp-run", str(tiny_bp_run), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    profile = json.loads((run_copy / "profile.json").read_text())
    assert profile["device"]["budget_bytes"] == 2**30 and profile["device"]["cores"] == 2
    assert profile["batch_size"] == 16 and profile["fits"] is True
    assert [b["index"] for b in profile["blocks"]] == [0, 1, 2]
    for b in profile["blocks"] + [profile["bp"]]:
        assert b["measured_peak_bytes"] > 0 and b["estimated_peak_bytes"] > 0 and b["step_ms"] > 0
        assert_within_target(b["estimate"], b["measured_peak_bytes"], b["folder"])
        assert b["error_percent"] == round(100 * (b["estimated_peak_bytes"] / b["measured_peak_bytes"] - 1), 1)
        assert 0 < b["file_backed_bytes"] < b["measured_peak_bytes"]
        assert b["estimate"]["total"] == b["estimated_peak_bytes"]
    assert profile["bp"]["run"] == str(tiny_bp_run)
    png = run_copy / "profile.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^\s+0\s+\d+\.\d MiB\s+\d+\.\d MiB\s+[+-]\d+\.\d%", out, re.MULTILINE), out
    assert "bp" in out and "wrote" in out


def test_profile_for_an_aarch64_board_measures_the_portable_step(tiny_portable_run: Path, tmp_path: Path) -> None:
    """A Pi trains on the portable graphs (no onnxruntime-training wheel for it): ``--backend auto`` with its
    profile measures and estimates those, not this host's training build."""
    import shutil

    from edgebll.devices.profiles import custom_profile
    from edgebll.profiler import profile_run

    run = Path(shutil.copytree(tiny_portable_run, tmp_path / "run"))
    pi = custom_profile("1GiB", arch="aarch64", name="pi")
    profile = profile_run(run, pi, steps=2, threads=1, plot=False, progress=False)
    assert [b["backend"] for b in profile["blocks"]] == ["portable", "portable"]
    assert [b["estimated_peak_bytes"] for b in profile["blocks"]] == [
        estimate_peak_bytes(run / f"block-{k}", backend="portable").total for k in range(2)]
    assert all(b["measured_peak_bytes"] > 0 for b in profile["blocks"])


def test_profile_refuses_a_bp_run_with_several_blocks(run_copy: Path, tiny_run: Path) -> None:
    assert main(["profile", str(run_copy), "--budget", "1GiB", "--steps", "2", "--bp-run", str(tiny_run),
                 "--no-plot", "--no-progress"]) == 2


@pytest.mark.slow
def test_a_block_trains_under_the_cap_and_fails_cleanly_below_it(run_copy: Path, baseline) -> None:  # type: ignore[no-untyped-def]
    block = run_copy / "block-0"
    estimate = estimate_peak_bytes(block).total
    measured = measure_block(block, baseline, steps=3, threads=1, budget=estimate, save=True, estimate=estimate, index=0)
    assert measured.peak_virtual_bytes <= address_space_cap(estimate, baseline)
    checkpoint = block / "trained" / "checkpoint"
    saved = checkpoint.read_bytes()

    quarter = estimate // 4
    with pytest.raises(MemoryCapError, match=rf"out of memory: block 0 needs about {estimate / 2**20:.1f} MiB, cap "
                                             rf"{quarter / 2**20:.1f} MiB \(RLIMIT_AS \d+\.\d MiB\)"):
        measure_block(block, baseline, steps=3, threads=1, budget=quarter, save=True, estimate=estimate, index=0)
    # the checkpoint of the run that fitted is untouched, and still loads (its sidecar hash matches)
    assert checkpoint.read_bytes() == saved
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint", "checkpoint.json"]
    assert BlockRunner(block).progress == {"epoch": 0, "step": 3}


@pytest.mark.slow
def test_the_child_itself_exits_nonzero_with_the_message(tiny_run: Path, baseline) -> None:  # type: ignore[no-untyped-def]
    estimate = estimate_peak_bytes(tiny_run / "block-0").total
    cap = address_space_cap(estimate // 4, baseline)
    done = subprocess.run([sys.executable, "-m", "edgebll.profile_child", "block", str(tiny_run / "block-0"),
                           "--steps", "3", "--threads", "1", "--cap", str(cap), "--estimate", str(estimate),
                           "--index", "0"], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout == ""
    if done.returncode == -signal.SIGABRT:
        # an allocation failure inside ORT's C++ aborts before Python sees it (where it fails depends on the
        # arena layout); the parent turns that death into the same message (the test above)
        assert "bad_alloc" in done.stderr, done.stderr[-2000:]
        return
    assert done.returncode == OOM_EXIT, done.stderr[-2000:]
    assert done.stderr.startswith(f"out of memory: block 0 needs about {estimate / 2**20:.1f} MiB, cap "
                                  f"{cap / 2**20:.1f} MiB of address space"), done.stderr


def test_inputs_follow_the_manifest_roles(tiny_run: Path) -> None:
    manifest = load_block_manifest(tiny_run / "block-2")
    x, labels = random_inputs(manifest, 8)
    assert x.dtype == np.float32 and list(x.shape[1:]) == manifest.input("message").per_sample_shape()
    assert labels.dtype == np.int64 and labels.shape == (8,) and 0 <= labels.min() and labels.max() < 10
