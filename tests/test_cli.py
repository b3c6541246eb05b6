"""The command line: help that explains itself, one-line errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebll.cli import main
from edgebll.runner import BlockRunner


@pytest.mark.parametrize("command", ["export", "train", "eval", "demo"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: edgebll {command}" in out and "--no-progress" in out


def test_top_level_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("export", "train", "eval", "demo", "edgebll train runs/a --epochs 1 --codec int8"):
        assert word in out


def test_user_error_is_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgebll: error: ManifestError:") and "run.json: missing" in err and "\n" not in err


def test_bad_codec_is_refused_by_the_parser(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tiny_run), "--codec", "int3"])
    assert exit_.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_train_then_resume_then_eval(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI round trip on real data: train 1 epoch, refuse to silently retrain, resume to 2, evaluate."""
    import json

    from conftest import require_real_data

    common = ["--data-dir", str(require_real_data()), "--no-progress"]
    assert main(["train", str(run_copy), "--epochs", "1", "--codec", "fp16", *common, "--limit", "64"]) == 0
    assert main(["train", str(run_copy), "--epochs", "2", *common, "--limit", "64"]) == 2
    assert "already hold trained weights" in capsys.readouterr().err
    assert main(["train", str(run_copy), "--epochs", "2", "--resume", *common, "--limit", "64"]) == 0
    train = json.loads((run_copy / "train.json").read_text())
    assert [e["epoch"] for e in train["epochs"]] == [1, 2] and train["steps"] == 8
    assert main(["eval", str(run_copy), *common, "--limit", "32"]) == 0
    evaluation = json.loads((run_copy / "eval.json").read_text())
    # eval uses the codec the run was trained with (the resumed epoch used the default, int8)
    assert evaluation["samples"] == 32 and evaluation["trained_epochs"] == 2 and evaluation["codec"] == "int8"
    # eval steps take the run's training batch (the size the memory profile covers), or --batch-size
    assert evaluation["batch_size"] == json.loads((run_copy / "run.json").read_text())["batch_size"]
    seen: list[int] = []
    eval_step = BlockRunner.eval_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockRunner, "eval_step", lambda self, x, side: seen.append(len(x)) or eval_step(self, x, side))
        assert main(["eval", str(run_copy), *common, "--limit", "32", "--batch-size", "12"]) == 0
    assert set(seen) == {12, 8} and json.loads((run_copy / "eval.json").read_text())["batch_size"] == 12
    assert main(["eval", str(run_copy), *common, "--batch-size", "0"]) == 2
    assert "the eval batch size must be at least 1, got 0" in capsys.readouterr().err


def test_blocks_auto_needs_a_board(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--blocks", "auto", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--blocks auto needs the board(s) to fit: --device NAME or --budget SIZE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--blocks", "many", "--out", str(tmp_path / "r")])
    assert "expected a number of blocks or 'auto', got 'many'" in capsys.readouterr().err


def changed(value: object, f: object) -> object:
    """A value of ``f``'s option other than its default."""
    meta = f.metadata  # type: ignore[attr-defined]
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple):
        return (0, 2)
    if value is None:
        return 0.25 if "learning rate" in meta["help"] else 3
    return value * 3 + 1


def test_every_training_option_reaches_the_cli_and_every_mpi_rank_unchanged() -> None:
    """One source: each TrainConfig / WorkerConfig field is a `train` option, and what `edgebll train --transport
    mpi` hands each rank (`worker_argv`) parses back, through `edgebll worker`'s parser, to an equal config."""
    from dataclasses import fields, replace

    from edgebll.cli import build_parser
    from edgebll.commands import train_config, worker_config
    from edgebll.launch import worker_argv
    from edgebll.runtime import TrainConfig
    from edgebll.worker import WorkerConfig

    parser = build_parser()
    train_help = parser.parse_known_args(["train", "run"])[0]
    for cls in (TrainConfig, WorkerConfig):
        assert [f.name for f in fields(cls) if not hasattr(train_help, f.name)] == [], cls
    train = replace(TrainConfig(), **{f.name: changed(f.default, f) for f in fields(TrainConfig)})
    worker = replace(WorkerConfig(), **{f.name: changed(f.default, f) for f in fields(WorkerConfig)})
    argv = worker_argv(train, worker, threads=1, restart=False, progress=False)
    args = parser.parse_args(["worker", "run", *argv])
    assert train_config(args) == train and worker_config(args) == worker
    defaults = parser.parse_args(["worker", "run", *worker_argv(TrainConfig(), WorkerConfig())])
    assert train_config(defaults) == TrainConfig() and worker_config(defaults) == WorkerConfig()
