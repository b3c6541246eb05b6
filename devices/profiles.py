"""Device profiles: what a board offers one training process, read from the TOML files shipped here.

    from edgebll.devices.profiles import load_profile, list_profiles, custom_profile
    pi = load_profile("rpi4-4gb")                 # a shipped profile, by name
    mine = load_profile("boards/my-board.toml")   # or any TOML file with the same keys
    tiny = custom_profile(budget="300MB", cores=2)

Every shipped file is ``boards/<name>.toml`` inside this package (loaded through
``importlib.resources``, so it works from a wheel as from a checkout). Keys map one to one onto
:class:`DeviceProfile`; unknown keys, missing keys and wrong types are refused with a
:class:`~edgebll.errors.DeviceError` that names the file.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from edgebll.errors import DeviceError
from edgebll.strict import from_plain

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

BOARDS_DIR = "boards"
"""Folder of this package holding one ``<name>.toml`` per board."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


DEFAULT_IDLE_RUNTIME_BYTES = 58 * 2**20
"""The idle runtime of a board whose profile does not give its own: the largest measured on
x86-64 (50-58 MiB resident with numpy and ORT 1.19's training API imported, benchmarks/results/memory.md
and `edgebll profile` runs); an aarch64 build is of the same order."""


@dataclass(kw_only=True, slots=True, frozen=True)
class DeviceProfile:
    """One board: its memory, the share of it a training process may use, its cores and its link."""

    name: str
    """Short identifier, the file's stem: ``edgebll profile RUN --device rpi4-4gb``."""
    title: str
    """The board's full name, for tables and figures."""
    arch: str
    """``uname -m`` of the board's usual 64-bit OS (``aarch64``); the wheel of ORT must match it."""
    cpu: str
    """Cores and clock, for people ("4x Cortex-A72 @ 1.8 GHz")."""
    cores: int
    """CPU cores: the most ORT threads worth running, or blocks (processes) training in parallel."""
    ram_bytes: int
    """Physical RAM (for the Jetsons, shared with the GPU)."""
    budget_bytes: int
    """Resident memory one training process may use: interpreter, ONNX Runtime and the block(s)
    together. RAM minus what the firmware, kernel and a headless OS hold, minus a margin."""
    budget_note: str
    """How ``budget_bytes`` was chosen, so that someone with a different OS image can redo it."""
    ethernet_bytes_per_s: int | None = None
    """Typical TCP throughput over the wired port (iperf3-like, not the line rate); None: no port."""
    wifi_bytes_per_s: int | None = None
    """Typical TCP throughput over the built-in Wi-Fi; None: no built-in Wi-Fi."""
    notes: str = ""
    """Anything else a user of this board needs: OS image, how to get ORT onto it, caveats."""
    idle_runtime_bytes: int | None = None
    """Resident memory of an idle edgebll process on this board (interpreter, numpy, ORT's training
    API), which a block's estimate does not include: ``edgebll profile RUN --device NAME`` on the
    board prints it. None: :data:`DEFAULT_IDLE_RUNTIME_BYTES`."""

    @property
    def backend(self) -> str:
        """The backend ``--backend auto`` trains with on this board: onnxruntime-training publishes x86-64
        wheels only, so any other board trains on the portable graphs with plain onnxruntime."""
        return "ort-training" if self.arch == "x86_64" else "portable"

    @property
    def idle_bytes(self) -> int:
        """The idle runtime to reserve out of ``budget_bytes`` before any block is placed."""
        return DEFAULT_IDLE_RUNTIME_BYTES if self.idle_runtime_bytes is None else self.idle_runtime_bytes

    def __post_init__(self) -> None:
        where = f"device profile {self.name!r}"
        if not _NAME.match(self.name):
            raise DeviceError(f"{where}: name must be lower-case letters, digits and '-', got {self.name!r}")
        for key in ("cores", "ram_bytes", "budget_bytes"):
            if getattr(self, key) <= 0:
                raise DeviceError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.budget_bytes > self.ram_bytes:
            raise DeviceError(f"{where}: budget_bytes {format_bytes(self.budget_bytes)} is more than ram_bytes "
                              f"{format_bytes(self.ram_bytes)}; hint: the budget is a share of the RAM")
        if self.idle_runtime_bytes is not None and not 0 < self.idle_runtime_bytes < self.budget_bytes:
            raise DeviceError(f"{where}: idle_runtime_bytes must be positive and below budget_bytes, got "
                              f"{self.idle_runtime_bytes}; hint: `edgebll profile` on the board measures it")
        for key in ("ethernet_bytes_per_s", "wifi_bytes_per_s"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise DeviceError(f"{where}: {key} must be positive (leave it out for no such link), got {value}")

    @property
    def link(self) -> tuple[str, int] | None:
        """The link blocks would normally talk over: ("ethernet" | "wifi", bytes/s); Ethernet when present."""
        if self.ethernet_bytes_per_s:
            return "ethernet", self.ethernet_bytes_per_s
        if self.wifi_bytes_per_s:
            return "wifi", self.wifi_bytes_per_s
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (as written into profile.json)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or a string such as "300MB" (10**6), "1.5GiB" (2**30), "512 MiB", "4096".

    Decimal units are kB, MB, GB, TB; binary ones KiB, MiB, GiB, TiB (case-insensitive). A
    fraction of a byte rounds down.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise DeviceError(f"size: expected an int or a string like '300MB' or '1.5GiB', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise DeviceError(f"size: expected a non-negative number of bytes, got {size}")
        return size
    match = _SIZE.match(size)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise DeviceError(f"size: cannot read {size!r}; expected a number and one of B, kB, MB, GB, TB, KiB, "
                          "MiB, GiB, TiB (e.g. '300MB', '1.5GiB')")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes for people: "312.5 MiB", "3.38 GiB", "812 B"."""
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def _parse(text: str, where: str, stem: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeviceError(f"{where}: not valid TOML ({exc})") from exc
    profile = from_plain(DeviceProfile, data, where, DeviceError, "a device profile")
    if profile.name != stem:
        raise DeviceError(f"{where}: name {profile.name!r} differs from the file name {stem!r}; hint: rename one")
    return profile


def _boards() -> Any:
    return resources.files("edgebll.devices").joinpath(BOARDS_DIR)


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, smallest budget first."""
    profiles = [_parse(entry.read_text(encoding="utf-8"), f"edgebll.devices/{BOARDS_DIR}/{entry.name}",
                       entry.name.removesuffix(".toml"))
                for entry in _boards().iterdir() if entry.name.endswith(".toml")]
    return sorted(profiles, key=lambda p: (p.budget_bytes, p.name))


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name ("rpi4-4gb"), or any TOML file by path ("my-board.toml")."""
    text = os.fspath(name_or_path)
    if _NAME.match(text) and not text.endswith(".toml"):
        entry = _boards().joinpath(f"{text}.toml")
        if not entry.is_file():
            names = ", ".join(p.name for p in list_profiles())
            raise DeviceError(f"unknown device {text!r}; shipped profiles: {names}; hint: pass a TOML file's path, "
                              "or --budget/--cores for a custom device")
        return _parse(entry.read_text(encoding="utf-8"), f"edgebll.devices/{BOARDS_DIR}/{text}.toml", text)
    path = Path(text)
    if not path.is_file():
        raise DeviceError(f"{path}: no such device profile file; hint: `edgebll devices` lists the shipped ones")
    return _parse(path.read_text(encoding="utf-8"), str(path), path.stem)


def custom_profile(budget: str | int = "300MB", cores: int = 2, *, name: str = "custom",
                   ram: str | int | None = None, arch: str | None = None,
                   idle_runtime: str | int | None = None) -> DeviceProfile:
    """A profile for a board without a file: ``budget`` (and ``ram``, which defaults to it, and
    ``idle_runtime``, see :attr:`DeviceProfile.idle_runtime_bytes`) as for :func:`parse_size`."""
    if isinstance(cores, bool) or not isinstance(cores, int):
        raise DeviceError(f"cores: expected an int, got {cores!r}")
    budget_bytes = parse_size(budget)
    return DeviceProfile(
        name=name, title=f"custom ({format_bytes(budget_bytes)}, {cores} cores)", arch=arch or platform.machine(),
        cpu=f"{cores} cores", cores=cores, ram_bytes=parse_size(ram) if ram is not None else budget_bytes,
        budget_bytes=budget_bytes, budget_note="given on the command line",
        idle_runtime_bytes=parse_size(idle_runtime) if idle_runtime is not None else None,
    )
