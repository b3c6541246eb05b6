"""The command line: help that explains itself, one-line errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebll.cli import main


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


def test_blocks_auto_needs_a_board(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--blocks", "auto", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--blocks auto needs the board(s) to fit: --device NAME or --budget SIZE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--blocks", "many", "--out", str(tmp_path / "r")])
    assert "expected a number of blocks or 'auto', got 'many'" in capsys.readouterr().err
