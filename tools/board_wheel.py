"""Build the wheel a Raspberry Pi or Jetson installs: edgebll with its codec cross-compiled for aarch64.

A wheel built on the host carries an x86-64 codec and is tagged for x86-64, so pip on a board
refuses it. This builds the same package with Debian's cross compiler and tags it
``py3-none-manylinux_2_17_aarch64`` (the codec is loaded with ctypes, so one wheel serves every
CPython; the tag is checked against the glibc symbols the library needs). A board then runs
``pip install edgebll-<version>-py3-none-manylinux_2_17_aarch64.whl``, which brings numpy,
onnxruntime and tqdm, and no torch.

Usage: ``python tools/board_wheel.py [--out dist]`` (``make wheel-aarch64``); needs
gcc-aarch64-linux-gnu and binutils-aarch64-linux-gnu, and the build tools of the host venv
(scikit-build-core, cmake, ninja, wheel).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLCHAIN = Path(__file__).with_name("aarch64-linux-gnu.cmake")
GLIBC = (2, 17)
"""The oldest glibc the tag promises (manylinux_2_17: Debian 8, Ubuntu 14.04 and every current board OS)."""
TAG = f"manylinux_{GLIBC[0]}_{GLIBC[1]}_aarch64"
CODEC = "edgebll/libedgebll_codec.so"


def glibc_needed(library: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version ``library`` (an aarch64 ELF) needs."""
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-T", str(library)], check=True, capture_output=True,
                          text=True).stdout
    versions = {tuple(int(p) for p in v.split(".")[:2]) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", dump)}
    return max(versions, default=(0, 0))  # type: ignore[return-value]


def build(out: Path) -> Path:
    """Build the board wheel into ``out``; returns its path."""
    missing = [tool for tool in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {missing}; apt-get install -y gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # _PYTHON_HOST_PLATFORM is how scikit-build-core (through sysconfig) learns the target's tag
        env = os.environ | {"_PYTHON_HOST_PLATFORM": "linux-aarch64", "CMAKE_TOOLCHAIN_FILE": str(TOOLCHAIN)}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                        "-w", tmp, "-C", f"build-dir={tmp}/build"], check=True, env=env)
        (built,) = Path(tmp).glob("edgebll-*-py3-none-linux_aarch64.whl")
        with zipfile.ZipFile(built) as wheel:
            library = Path(wheel.extract(CODEC, tmp))
        needed = glibc_needed(library)
        if needed > GLIBC:
            raise SystemExit(f"{CODEC} needs GLIBC {needed[0]}.{needed[1]}, newer than the tag's {GLIBC}")
        # the wheel package's own retagging (it rewrites WHEEL and RECORD)
        retagged = subprocess.run([sys.executable, "-m", "wheel", "tags", "--remove", "--platform-tag", TAG, str(built)],
                                  check=True, capture_output=True, text=True).stdout.split()[-1]
        target = out / retagged
        shutil.move(Path(tmp) / retagged, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "dist"), help="where the wheel goes (default: dist/)")
    print(build(Path(parser.parse_args(argv).out)))


if __name__ == "__main__":
    main()
