"""Run-level checkpoints: a step counts as saved when every block of the run has saved it, or not at all.

Each block saves its state atomically (``BlockRunner.save``) and keeps a hard-linked copy under
``trained/history/step-N``; a saved file is never rewritten in place, so the link pins it. Once
every block holds step N, ``progress.json`` (the run's commit record) is replaced atomically and
older copies are dropped. A crash at any moment thus leaves ``progress.json`` naming a step whose
copies every block still has; loading a run puts every block back to that step. The in-process
runtime and the MPI ranks share this layout, so a run checkpointed by one resumes on the other.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgebll.errors import DiskFullError, ManifestError, TrainingError
from edgebll.json_files import read_json_file, write_json_atomic
from edgebll.manifest import BlockManifest
from edgebll.portable_schema import STATE_FILE

PROGRESS_NAME = "progress.json"
"""Run-level marker: the last step every block has checkpointed, with what resuming needs."""
HISTORY_DIR = "history"
"""``block-K/trained/history/step-N``: the block's saved files of step N (hard links)."""
TRAINED_DIR = "trained"
"""Sub-folder of a block folder holding the trained state (the exported files stay untouched)."""
TRAINED_STATE = {"ort-training": "checkpoint", "portable": STATE_FILE}
"""Each backend's trained state in a block's ``trained/`` (one at a time: a save removes the other's)."""
TRAINED_FILES = ("checkpoint", "checkpoint.json", STATE_FILE, "portable_state.json")
"""What ``trained/`` may hold: each backend's state and its sidecar."""
MAX_PROGRESS_BYTES = 4 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def history_dir(block_dir: Path, step: int) -> Path:
    return block_dir / TRAINED_DIR / HISTORY_DIR / f"step-{step}"


def keep_step(block_dir: Path, files: Iterable[str], step: int, extra: dict[str, str] | None = None) -> Path:
    """Pin the block's just-saved ``files`` (and ``extra``: name -> text) as ``history/step-<step>``, atomically."""
    keep = history_dir(block_dir, step)
    tmp = keep.with_name(f".{keep.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in files:
        os.link(block_dir / TRAINED_DIR / name, tmp / name)
    for name, text in (extra or {}).items():
        write_json_atomic(tmp / name, text)
    shutil.rmtree(keep, ignore_errors=True)
    os.replace(tmp, keep)
    return keep


def prune_history(block_dirs: Iterable[Path], below: int) -> None:
    """Drop the copies of steps before ``below`` (the step just marked) and any half-made ones."""
    for block_dir in block_dirs:
        for folder in (block_dir / TRAINED_DIR / HISTORY_DIR).glob("*step-*"):
            if folder.name.startswith(".") or int(folder.name.split("-")[1]) < below:
                shutil.rmtree(folder, ignore_errors=True)


def mark_step(run_dir: Path, record: dict[str, Any]) -> None:
    """Record atomically that every block holds step ``record["step"]``."""
    path = Path(run_dir) / PROGRESS_NAME
    with disk_full_is_an_error(path, 4096, what_stays(run_dir)):
        write_json_atomic(path, json.dumps(record))


def what_stays(run_dir: Path) -> str:
    """For an error: the checkpoint that a failed save leaves as the run's last complete one."""
    previous = read_progress(run_dir)
    return (f"the run's checkpoint of step {previous['step']} stays complete ({PROGRESS_NAME})" if previous
            else "no step of the run was checkpointed before")


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """``progress.json`` checked (None: no step was checkpointed by every block yet)."""
    path = Path(run_dir) / PROGRESS_NAME
    if not path.is_file():
        return None
    hint = f"hint: delete it and --restart, or restore {PROGRESS_NAME} from a copy of the run"
    record = read_json_file(path, MAX_PROGRESS_BYTES, ManifestError, hint)
    step = record.get("step") if isinstance(record, dict) else None
    if type(step) is not int or step < 0:
        raise ManifestError(f"{path}: 'step' must be an integer >= 0, got {step!r}; {hint}")
    return record


def sidecar_of(state_file: Path) -> Path:
    """The JSON next to a trained state that holds its progress and sha256 (``checkpoint`` -> ``checkpoint.json``)."""
    return state_file.with_name(f"{state_file.name.split('.')[0]}.json")


def saved_step(block_dir: Path) -> int | None:
    """The step a block's trained state was last saved at, from its sidecar (None: not trained).

    Not hashed: a save writes the sidecar before it replaces the state, so the sidecar never names an
    older step than the file holds; a sidecar that names the run's marked step therefore vouches for
    the file (which the runner hashes when it loads it), and any other step means "restore".
    """
    for name in TRAINED_STATE.values():
        state = block_dir / TRAINED_DIR / name
        if state.is_file():
            try:
                return int(json.loads(sidecar_of(state).read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                return -1  # unreadable: not the marked step, so it is restored
    return None


def restore_step(block_dirs: Iterable[Path], step: int, steps_of: Callable[[Path], int | None]) -> list[str]:
    """Put every block of ``block_dirs`` back to the copy of ``step`` where its ``trained/`` holds another step.

    ``steps_of(block_dir)``: the step its trained state holds (None: none). Returns what was put back,
    for a note to the user.
    """
    moved = []
    for block_dir in block_dirs:
        held = steps_of(block_dir)
        if held == step:
            continue
        saved = history_dir(block_dir, step)
        kept = [name for name in TRAINED_FILES if (saved / name).is_file()]
        if not kept:
            raise ManifestError(f"{saved} is missing, but {PROGRESS_NAME} says every block saved step {step}; hint: "
                                "copy that folder from where the block trained, or --restart")
        for name in TRAINED_FILES:  # the other backend's files too: only the restored state may remain
            target = block_dir / TRAINED_DIR / name
            if name in kept:
                tmp = target.with_name(f".{name}.restore")
                shutil.copyfile(saved / name, tmp)
                os.replace(tmp, target)
            else:
                target.unlink(missing_ok=True)
        moved.append(f"{block_dir.name if block_dir.name != 'feedback' else block_dir.parent.name + '/feedback'} "
                     f"(held step {held})")
    return moved


def save_blocks(runners: Iterable[Any], *, step: int, epoch: int, run_dir: Path,
                extra: dict[Path, dict[str, str]] | None = None) -> None:
    """Save every one of ``runners`` (all at ``step``) and pin each save as ``history/step-<step>``.

    Weights that are no longer finite, or that turn the last batch into non-finite messages or logits
    (one eval forward per block), are refused before anything is written, and a full disk is a
    DiskFullError; either way the run's last complete checkpoint stays. ``extra``: per block folder,
    more files to keep with its copy (an MPI rank's totals).
    """
    runners = list(runners)
    safe = what_stays(run_dir)
    for runner in runners:
        bad = next((name for name, value in runner.parameters().items() if not np.all(np.isfinite(value))), None)
        if bad is not None:
            raise TrainingError(f"{runner.name}: weight {bad} is not finite after step {step}; nothing was saved at "
                                f"this step and {safe}; hint: lower the learning rate (--lr)")
        outputs = runner.nonfinite_outputs()
        if outputs is not None:
            raise TrainingError(f"{runner.name}: its weights after step {step} give a non-finite {outputs} on the "
                                f"last batch; nothing was saved at this step and {safe}; hint: lower the learning "
                                "rate (--lr)")
    for runner in runners:
        with disk_full_is_an_error(runner.block_dir / TRAINED_DIR / runner.trained_files[0],
                                   checkpoint_bytes(runner.manifest, runner.block_dir), safe):
            runner.save(epoch=epoch)
            keep_step(runner.block_dir, runner.trained_files, step, (extra or {}).get(runner.block_dir))


def remove_leftovers(block_dirs: Iterable[Path], run_dir: Path | None = None) -> None:
    """Delete what a process killed in the middle of a save left behind (temp files, half-made copies), and with
    ``run_dir`` its half-written ``progress.json``."""
    stale = list(Path(run_dir).glob(f".{PROGRESS_NAME}.*.tmp")) if run_dir is not None else []
    for block_dir in block_dirs:
        trained = block_dir / TRAINED_DIR
        stale += [*trained.glob(".*.tmp"), *trained.glob(".*.restore")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def clear_trained(block_dirs: Iterable[Path], run_dir: Path | None = None) -> None:
    """Forget the trained states of ``block_dirs`` (starting over), and with ``run_dir`` its ``progress.json``."""
    for block_dir in block_dirs:
        shutil.rmtree(block_dir / TRAINED_DIR, ignore_errors=True)
    if run_dir is not None:
        (Path(run_dir) / PROGRESS_NAME).unlink(missing_ok=True)


def checkpoint_bytes(manifest: BlockManifest, block_dir: Path) -> int:
    """Disk one more checkpoint of the block takes: its last saved state's size, else an upper bound (weights and
    the optimizer's moments in float32: two for AdamW, none for SGD; plus room for buffers and the file format)."""
    for name in TRAINED_STATE.values():
        path = block_dir / TRAINED_DIR / name
        if path.is_file():
            return path.stat().st_size
    moments = 0 if manifest.optimizer.get("type") == "sgd" else 2  # an older manifest without the type: AdamW's
    return manifest.num_parameters * 4 * (1 + moments) + (256 << 10)


def check_disk_room(run_dir: Path, need: int) -> None:
    """Refuse to start training when the disk cannot hold one more checkpoint of the run (``need`` bytes)."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DiskFullError(f"{run_dir}: one more checkpoint of the run needs {_mib(need)} free, the disk has "
                            f"{_mib(free)}; the training would stop at its first save; hint: free space there or "
                            "copy the run to a larger disk")


@contextmanager
def disk_full_is_an_error(path: Path, need: int, safe: str) -> Iterator[None]:
    """Turn "no space left" while writing ``path`` into a DiskFullError that says what to free and what is safe."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL and "No space left" not in str(exc):  # ORT reports it as a RuntimeError text
            raise
        raise _disk_full(path, need, safe) from exc
    except RuntimeError as exc:  # onnxruntime-training's save_checkpoint wraps the OSError in its own message
        if "No space left" not in str(exc) and "Disk quota" not in str(exc):
            raise
        raise _disk_full(path, need, safe) from exc


def _disk_full(path: Path, need: int, safe: str) -> DiskFullError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
    return DiskFullError(f"{path}: the disk is full ({_mib(free)} free; writing this file needs about "
                         f"{_mib(need)}); {safe}; hint: free space on that disk, then continue with --resume")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def note(text: str) -> None:
    print(f"edgebll: {text}", file=sys.stderr, flush=True)
