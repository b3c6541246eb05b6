"""A run folder's layout and its ``run.json``: the model, method, block count and hyper-parameters of a run.

    runs/a/run.json                   read by :func:`load_run_config`, checked key by key
    runs/a/block-0/ .. block-(K-1)/   one block folder each (:func:`block_dir_name`)
    runs/a/block-k/feedback/          a BLL block's feedback block (:data:`FEEDBACK_DIR`)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgebll.errors import ManifestError
from edgebll.json_files import read_json_file
from edgebll.strict import from_plain

RUN_NAME = "run.json"
RUN_FORMAT_VERSION = 1
METHODS = ("bp", "bwbpf", "bll", "predsim")
"""The training methods a run can be exported with (run.json's and every manifest's ``method``)."""
FEEDBACK_DIR = "feedback"
"""Sub-folder of a BLL block folder holding its feedback block (both train on the same device)."""
MAX_RUN_CONFIG_BYTES = 4 << 20
"""run.json is a few KiB; anything near this is not one (and is not read into memory)."""


def block_dir_name(index: int) -> str:
    return f"block-{index}"


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """``run.json``: what a run was exported as (written by ``edgebll export``, read by every command)."""

    format_version: int = RUN_FORMAT_VERSION
    model: str
    method: str
    blocks: int
    batch_size: int
    lr: float
    """The default learning rate of ``edgebll train``."""
    num_classes: int | None = None
    input_shape: list[int] = field(default_factory=list)
    data: dict[str, Any] | None = None
    """The dataset the run trains on (name, split files' sha256); None: Fashion-MNIST (runs before datasets)."""
    units: list[list[str]] = field(default_factory=list)
    """Each forward block's unit names."""
    head: str | None = None
    latent: str | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    predsim: dict[str, Any] | None = None
    backends: list[str] = field(default_factory=list)
    """The backends every block offers ("ort-training", "portable")."""
    init_from: dict[str, Any] | None = None
    partition: dict[str, Any] | None = None
    """``--blocks auto``: the boundaries chosen and why."""

    @property
    def is_bll(self) -> bool:
        return self.method == "bll"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_dirs(run_dir: str | os.PathLike, config: RunConfig | None = None, *,
               feedback_after_each: bool = False) -> list[Path]:
    """Every block folder of a run: the forward blocks, then (BLL) their feedback blocks; with
    ``feedback_after_each``, each forward block followed by its own feedback block (the profile's order)."""
    config = config or load_run_config(run_dir)
    forward = [Path(run_dir) / block_dir_name(k) for k in range(config.blocks)]
    feedback = [f / FEEDBACK_DIR for f in forward[:-1]] if config.is_bll else []
    if not feedback_after_each:
        return forward + feedback
    return [folder for k, f in enumerate(forward) for folder in [f, *feedback[k:k + 1]]]


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read ``run.json`` (model, data, hyper-parameters) of a run folder, every key checked for type and range."""
    path = Path(run_dir) / RUN_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; {run_dir} is not an exported run; hint: `edgebll export --out {run_dir}`")
    config = read_json_file(path, MAX_RUN_CONFIG_BYTES, ManifestError, "hint: re-export the run")
    _check_run_config(config, path)
    version = config.get("format_version", RUN_FORMAT_VERSION)
    if isinstance(version, int) and version > RUN_FORMAT_VERSION:
        raise ManifestError(f"{path}: format version {version} is newer than this runtime supports "
                            f"({RUN_FORMAT_VERSION}); hint: upgrade edgebll here, or export with this version")
    return from_plain(RunConfig, config, str(path), ManifestError, "run.json")


def _check_run_config(config: Any, path: Path) -> None:
    """The ranges of the fields every command reads; the message names the key (types: :func:`from_plain`)."""
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: holds a JSON {type(config).__name__}, not an object; hint: re-export the run")

    def integer(key: str, least: int) -> None:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ManifestError(f"{path}: {key!r} must be an integer >= {least}, got {value!r}; hint: re-export the run")

    integer("blocks", 1)
    integer("batch_size", 1)
    if config.get("method") not in METHODS:
        raise ManifestError(f"{path}: 'method' must be one of {list(METHODS)}, got {config.get('method')!r}")
    if not isinstance(config.get("model"), str):
        raise ManifestError(f"{path}: 'model' must be the model's name, got {config.get('model')!r}")
    lr = config.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ManifestError(f"{path}: 'lr' must be a finite number > 0, got {lr!r}; hint: re-export the run")
    if config.get("num_classes") is not None:
        integer("num_classes", 2)
    if config.get("data") is not None and not isinstance(config["data"], dict):
        raise ManifestError(f"{path}: 'data' must be an object naming the dataset, got {config['data']!r}")
