"""The artifact contract: ``manifest.json`` of one block folder, and the checks that a run's blocks form one chain.

A device validates a block folder against its manifest before it trains: format version, the
files' sha256, and the shapes of the messages it will receive. Everything here is plain JSON so
that a board needs neither torch nor onnx to read it. The run's own ``run.json`` is read by
:mod:`edgebll.run_folder`; the portable graphs' part of a manifest is :mod:`edgebll.portable_schema`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgebll.errors import ManifestError
from edgebll.json_files import read_json_file
from edgebll.portable_schema import PORTABLE_FILES, PortableSchema
from edgebll.run_folder import METHODS, RunConfig, block_dir_name
from edgebll.strict import from_plain

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
KINDS = ("forward", "feedback")
ROLES = ("message", "labels", "target", "prior", "loss", "logits", "metric", "bn_stat")
MAX_MANIFEST_BYTES = 4 << 20
"""A manifest is a few KiB; anything near this is not one (and is not read into memory)."""


@dataclass(kw_only=True, slots=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    shape: list[int | str]
    """Dimensions; a string is a symbolic dimension ("batch")."""
    dtype: str
    """numpy dtype name: "float32" or "int64"."""
    role: str
    """message (activation in/out, or BLL's beta), labels (int64 classes), target (one-hot float),
    prior (BLL's mixing weight times the feedback natural parameters), loss, logits (natural
    parameters / class scores), metric (reported, not differentiated), bn_stat."""

    def per_sample_shape(self) -> list[int | str]:
        """The shape without the leading batch dimension."""
        return self.shape[1:] if self.shape and self.shape[0] == "batch" else self.shape


@dataclass(kw_only=True, slots=True)
class BatchNormStat:
    """A BatchNorm running statistic that the training graph outputs and the runtime writes back.

    ORT bakes running statistics into the graph as constants; unless they are written back after
    each step, eval-mode BatchNorm keeps its initial statistics forever.
    """

    output: str
    """Training-graph output carrying the updated statistic."""
    parameter: str
    """Checkpoint entry holding the statistic."""
    kind: str
    """"mean" or "var"."""
    momentum: float
    """ONNX momentum: new = momentum * old + (1 - momentum) * batch statistic."""
    spatial: int
    """Elements per channel per sample seen by the BatchNorm (H*W); torch's running variance is the
    unbiased one, so the runtime rescales ORT's biased update by n/(n-1), n = batch * spatial."""


@dataclass(kw_only=True, slots=True)
class BlockManifest:
    """Everything a device needs to know about one exported block."""

    format_version: int = FORMAT_VERSION
    index: int
    num_blocks: int
    method: str
    kind: str = "forward"
    """"forward", or "feedback" for a BLL feedback block (in ``block-k/feedback``)."""
    model: str
    units: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    bn_stats: list[BatchNormStat] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    batch_size: int
    num_parameters: int
    estimated_peak_bytes: int
    """Rough peak training memory at ``batch_size``: weights, gradients, optimizer state, activations."""
    device: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes of each file in ``files``: checked before the file is hashed, so a swapped-in huge file is refused at
    once (manifests written before it have none: their files are hashed as they are)."""
    """File name -> sha256 hex digest."""
    portable: PortableSchema | None = None
    """The portable graphs' state layout (``PORTABLE_FILES``); None when the block was exported without them."""

    def backends(self) -> list[str]:
        """The backends whose files the manifest lists: "ort-training" and/or "portable"."""
        found = []
        if all(name in self.files for name in ARTIFACT_FILES):
            found.append("ort-training")
        if self.portable is not None and all(name in self.files for name in PORTABLE_FILES):
            found.append("portable")
        return found

    def estimated_bytes(self, backend: str) -> int:
        """The estimated peak training memory on ``backend`` ("ort-training" or "portable"); 0: not estimated."""
        if backend == "portable":
            return self.portable.estimated_peak_bytes if self.portable is not None else 0
        return self.estimated_peak_bytes

    def input(self, role: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.role == role), None)

    def output(self, role: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.role == role), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> BlockManifest:
        """Build from parsed JSON, refusing unknown or missing keys and newer formats."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: holds a JSON {type(data).__name__}, not an object; this is not an edgebll "
                                "block manifest")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ManifestError(f"{where}: no integer 'format_version'; this is not an edgebll block manifest")
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format version {version} is newer than this runtime supports ({FORMAT_VERSION}); "
                "hint: upgrade edgebll on the device, or export with the edgebll version installed here"
            )
        manifest = from_plain(cls, data, where, ManifestError, "a block manifest")
        if not isinstance(manifest.files, dict):
            raise ManifestError(f"{where}: 'files' must map file names to sha256 digests")
        for name, digest in manifest.files.items():
            if not _plain_file_name(name):
                raise ManifestError(f"{where}: file name {name!r} is not a plain name inside the block folder (no "
                                    "folders, '..' or absolute paths); the manifest was tampered with; hint: re-export")
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ManifestError(f"{where}: the sha256 of {name!r} is not 64 hex digits")
        if not isinstance(manifest.sizes, dict) or not set(manifest.sizes) <= set(manifest.files) or not all(
                type(n) is int and n >= 0 for n in manifest.sizes.values()):
            raise ManifestError(f"{where}: 'sizes' must map the names in 'files' to byte counts; hint: re-export")
        if manifest.method not in METHODS:
            raise ManifestError(f"{where}: unknown method {manifest.method!r}; this runtime knows {list(METHODS)}")
        if manifest.kind not in KINDS:
            raise ManifestError(f"{where}: unknown block kind {manifest.kind!r}; expected one of {list(KINDS)}")
        roles = {t.role for t in manifest.inputs + manifest.outputs}
        if not roles <= set(ROLES):
            raise ManifestError(f"{where}: unknown tensor roles {sorted(roles - set(ROLES))}; this runtime knows {list(ROLES)}")
        return manifest


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_block_manifest(block_dir: str | os.PathLike, *, verify_files: bool = True) -> BlockManifest:
    """Read and validate ``block_dir/manifest.json``; with ``verify_files`` check every file's sha256."""
    block_dir = Path(block_dir)
    path = block_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; hint: export the run again with `edgebll export ... --out RUN`")
    data = read_json_file(path, MAX_MANIFEST_BYTES, ManifestError, "hint: re-export the run")
    manifest = BlockManifest.from_dict(data, str(path))
    if not manifest.backends():
        missing = [name for name in ARTIFACT_FILES if name not in manifest.files]
        raise ManifestError(f"{path}: lists no hash for {missing}")
    if verify_files:
        for name, expected in manifest.files.items():
            file = block_dir / name
            if file.is_symlink():
                raise ManifestError(f"block {manifest.index} ({block_dir}): {name} is a symbolic link; a run folder holds "
                                    "its own files; hint: copy the run with its files (cp -rL), or re-export it")
            if not file.is_file():
                raise ManifestError(f"block {manifest.index} ({block_dir}): file {name!r} is missing; hint: re-export the run")
            size = file.stat().st_size
            if name in manifest.sizes and size != manifest.sizes[name]:  # refused before a byte of it is read
                raise ManifestError(f"block {manifest.index} ({block_dir}): {name} has {size} bytes but the manifest "
                                    f"says {manifest.sizes[name]}; the file was replaced or truncated; hint: re-export "
                                    "the run")
            got = sha256_file(file)
            if got != expected:
                raise ManifestError(
                    f"block {manifest.index} ({block_dir}): {name} has sha256 {got[:16]}… but the manifest says "
                    f"{expected[:16]}…; the file was modified or corrupted; hint: re-export the run"
                )
    return manifest


def _plain_file_name(name: object) -> bool:
    """A file directly in the block folder: no separators, no '..', not absolute, not empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not os.path.isabs(name))


def check_run_agrees(config: RunConfig, manifests: list[BlockManifest], run_dir: str | os.PathLike) -> None:
    """run.json and the block manifests must describe one run: block count and training batch size."""
    if len(manifests) != config.blocks:
        raise ManifestError(f"{run_dir}: run.json says {config.blocks} blocks, {len(manifests)} were loaded")
    sizes = sorted({m.batch_size for m in manifests})
    if sizes != [config.batch_size]:
        raise ManifestError(f"{run_dir}: run.json's batch_size {config.batch_size} differs from the manifests' "
                            f"{sizes}; the run was edited or mixed from two exports; hint: re-export the run")


def check_chain(manifests: list[BlockManifest], run_dir: str | os.PathLike) -> None:
    """Each block's message input must match the previous block's message output (shape and dtype)."""
    for k, m in enumerate(manifests):
        if m.index != k or m.num_blocks != len(manifests):
            raise ManifestError(
                f"{run_dir}/{block_dir_name(k)}: manifest says block {m.index} of {m.num_blocks}, expected block {k} of "
                f"{len(manifests)}; hint: re-export all blocks together"
            )
        if k == 0:
            continue
        sent, wanted = manifests[k - 1].output("message"), m.input("message")
        if sent is None or wanted is None:
            raise ManifestError(f"{run_dir}: block {k - 1} sends no message or block {k} takes none")
        if sent.per_sample_shape() != wanted.per_sample_shape() or sent.dtype != wanted.dtype:
            raise ManifestError(
                f"block {k} ({run_dir}/{block_dir_name(k)}/manifest.json): input {wanted.name!r} has shape "
                f"{wanted.per_sample_shape()} ({wanted.dtype}) per sample but the previous block sends "
                f"{sent.per_sample_shape()} ({sent.dtype}); hint: re-export both blocks with the same --blocks"
            )
