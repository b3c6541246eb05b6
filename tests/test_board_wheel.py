"""The board wheel: edgebll with an aarch64 codec, tagged for aarch64, that pip resolves to numpy, onnxruntime, tqdm.

Needs Debian's gcc-aarch64-linux-gnu and binutils-aarch64-linux-gnu (``make test`` installs them), and
the package index for the resolution check (pip's own configuration names it).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ELF_AARCH64 = 183  # e_machine of an ARM 64-bit ELF file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="cross-builds from an x86-64 host"),
]


def _board_wheel():
    spec = importlib.util.spec_from_file_location("board_wheel", REPO / "tools" / "board_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("aarch64-linux-gnu-objdump") is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and binutils-aarch64-linux-gnu (apt-get install -y ...)")
    return _board_wheel().build(tmp_path_factory.mktemp("dist"))


def test_board_wheel_carries_an_aarch64_codec_and_its_tag(wheel: Path, tmp_path: Path) -> None:
    board_wheel = _board_wheel()
    assert wheel.name == "edgebll-0.1.0-py3-none-manylinux_2_17_aarch64.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        library = Path(archive.extract(board_wheel.CODEC, tmp_path))
        tags = [line for line in archive.read("edgebll-0.1.0.dist-info/WHEEL").decode().splitlines()
                if line.startswith("Tag:")]
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_AARCH64
    assert board_wheel.glibc_needed(library) <= board_wheel.GLIBC
    assert tags == ["Tag: py3-none-manylinux_2_17_aarch64"]
    # the runtime, the exporter and the board profiles; no tests or benchmarks
    assert {"edgebll/portable.py", "edgebll/export/portable.py", "edgebll/devices/boards/rpi4-2gb.toml"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_pip_on_a_board_installs_numpy_onnxruntime_and_tqdm_with_it(wheel: Path, tmp_path: Path) -> None:
    """What ``pip install`` of the wheel brings on aarch64 CPython 3.11: no torch, no training build.

    pip evaluates a wheel's environment markers on the machine it runs on, even with --platform, so
    the markers are evaluated here for a board, and pip resolves what they leave for aarch64.
    """
    from packaging.markers import default_environment
    from packaging.metadata import Metadata

    with zipfile.ZipFile(wheel) as archive:
        metadata = Metadata.from_email(archive.read("edgebll-0.1.0.dist-info/METADATA"), validate=False)
    board = default_environment() | {"platform_machine": "aarch64", "python_version": "3.11",
                                     "python_full_version": "3.11.2", "extra": ""}
    needed = [r for r in metadata.requires_dist if r.marker is None or r.marker.evaluate(board)]
    assert sorted(r.name for r in needed) == ["numpy", "onnxruntime", "tqdm"]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
                           str(report), "--target", str(tmp_path / "site"), "--only-binary=:all:",
                           "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
                           "--python-version", "3.11", "--implementation", "cp", str(wheel), "--no-deps",
                           *(f"{r.name}{r.specifier}" for r in needed)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"edgebll", "numpy", "onnxruntime", "tqdm"} <= installed, installed
    assert not {"torch", "onnxruntime-training", "onnxruntime-training-cpu"} & installed
