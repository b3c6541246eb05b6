"""The C kernel against the numpy reference: the same frame, byte for byte, and the same decoded bits,
on adversarial and activation-like messages, on every x86-64 kernel copy and on an aarch64 build."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import codec_helpers
import numpy as np
import pytest
from codec_helpers import BACKENDS, HYPOTHESIS, INT_CODECS, LEVELS, REPO, bits, finite_float32, require_native, shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebll import codec
from edgebll.codec import native, reference
from edgebll.errors import CodecError

fresh_loader = codec_helpers.fresh_loader  # a pytest fixture: forgets the loaded library around the test


@settings(HYPOTHESIS, max_examples=200)
@given(
    x=hnp.arrays(np.float32, shapes, elements=finite_float32),
    codec_name=st.sampled_from(codec.CODECS),
    granularity=st.sampled_from(codec.GRANULARITIES),
    group_size=st.integers(1, 70),
    rounding=st.sampled_from(codec.ROUNDINGS),
    seed=st.integers(0, 2**64 - 1),
)
def test_c_frame_equals_numpy_frame_for_any_finite_input(
    x: np.ndarray, codec_name: str, granularity: str, group_size: int, rounding: str, seed: int
) -> None:
    """Adversarial values (subnormals, FLT_MAX, -0.0, mixed magnitudes), every codec, layout and
    rounding, group sizes that split bytes and channels: same bytes, same decoded bits."""
    require_native()
    if granularity == "channel" and x.ndim < 2:
        granularity = "tensor"
    if codec_name not in INT_CODECS:
        rounding = "nearest"
    options = {"granularity": granularity, "group_size": group_size, "rounding": rounding, "seed": seed}
    if codec_name == "fp16" and x.size and np.abs(x).max() >= 65520:
        for backend in BACKENDS:  # both refuse the same way
            with pytest.raises(CodecError, match="beyond the float16 range"):
                codec.encode(x, codec_name, backend=backend, **options)
        return
    frame_c = codec.encode(x, codec_name, backend="c", **options)
    frame_numpy = codec.encode(x, codec_name, backend="numpy", **options)
    assert frame_c == frame_numpy
    assert len(frame_c) == codec.frame_nbytes(x.shape, codec_name, granularity, group_size)
    decoded_c = codec.decode(frame_c, backend="c")
    decoded_numpy = codec.decode(frame_c, backend="numpy")
    assert decoded_c.shape == x.shape and decoded_c.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded_c), bits(decoded_numpy))


ACTIVATION_SHAPES = [(64, 32, 14, 14), (256, 10), (3, 5, 7), (1, 1), (0, 4, 2), (2, 0, 3)]


LAYOUTS = [
    *((shape, granularity, 64) for shape in ACTIVATION_SHAPES for granularity in ("tensor", "channel", "group")),
    ((1000,), "tensor", 64),  # channel needs ndim >= 2: test_channel_granularity_needs_two_dims
    ((1001,), "group", 64),  # a short last group
    ((3, 5, 7), "group", 3),  # odd groups: int4/int2 bytes straddle groups
    ((64, 32, 7, 7), "channel", 64),  # 49 values per channel map: bytes straddle channels
    ((64, 32, 7, 7), "group", 49),
]


@pytest.mark.parametrize("shape, granularity, group_size", LAYOUTS)
@pytest.mark.parametrize("codec_name", codec.CODECS)
def test_c_equals_numpy_on_activation_like_messages(
    shape: tuple[int, ...], codec_name: str, granularity: str, group_size: int
) -> None:
    """Realistic messages: per-channel magnitudes spanning 1e-3..1e3, ReLU zeros, an all-zero channel."""
    require_native()
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2 and shape[1] > 1:
        x *= np.logspace(-3, 3, shape[1], dtype=np.float32).reshape((1, -1) + (1,) * (len(shape) - 2))
        x[:, 1] = 0.0
    x = np.maximum(x, 0, where=rng.random(shape) < 0.3, out=x)
    roundings = codec.ROUNDINGS if codec_name in INT_CODECS else ("nearest",)
    for rounding in roundings:
        options = {"granularity": granularity, "group_size": group_size, "rounding": rounding, "seed": sum(shape)}
        frame_c = codec.encode(x, codec_name, backend="c", **options)
        assert frame_c == codec.encode(x, codec_name, backend="numpy", **options)
        np.testing.assert_array_equal(bits(codec.decode(frame_c, backend="c")), bits(codec.decode(frame_c, backend="numpy")))


def build_library(folder: Path, *defines: str) -> Path:
    """Compile csrc/ into `folder` with the flags CMakeLists.txt uses plus `defines`; skips without cc."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    library = folder / native.LIBRARY_FILENAMES[0]
    subprocess.run([compiler, "-std=c11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-shared", "-fPIC",
                    *defines, f"-I{REPO / 'csrc'}", str(REPO / "csrc" / "codec.c"), "-o", str(library)], check=True)
    return library


# The x86-64 builds below the installed one, which runs the AVX-512 or AVX2 copies of the kernels
# (KERNEL in csrc/codec.c): these check the narrower copies on this CPU too.
X86_BUILDS = {"no AVX-512": "-DEDGEBLL_CODEC_NO_AVX512", "baseline": "-DEDGEBLL_CODEC_NO_CLONES"}


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 copies exist on x86-64 only")
@pytest.mark.parametrize("build", X86_BUILDS)
def test_builds_without_the_wide_copies_give_the_same_frames(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_loader: None, build: str
) -> None:
    """The installed library runs this machine's widest kernels; build the narrower ones too and compare.

    Random bit patterns (subnormals, huge values, ties) and every layout of test_c_equals_numpy_...
    """
    define = X86_BUILDS[build]
    library = build_library(tmp_path, define)
    monkeypatch.setattr(native, "search_dirs", lambda: [tmp_path])
    assert native.find_library(native.search_dirs()) == library and codec.native_available()
    rng = np.random.default_rng(42)
    cases = []
    for _ in range(30):
        shape = tuple(rng.integers(1, 12, rng.integers(1, 5)))
        raw = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
        scale = np.float32(2.0 ** rng.integers(-20, 20))
        cases.append(np.where(np.isfinite(raw), raw, 0) if rng.random() < 0.3 else (rng.standard_normal(shape) * scale).astype(np.float32))
    for levels in LEVELS.values():  # exact ties at scale 1: every x.5 between -L and L
        cases.append(np.arange(-levels, levels + 0.5, 0.5, dtype=np.float32).reshape(1, -1))
    for x in cases:
        for codec_name in codec.CODECS:
            for granularity in ("tensor", "channel", "group") if x.ndim >= 2 else ("tensor", "group"):
                for rounding in codec.ROUNDINGS if codec_name in INT_CODECS else ("nearest",):
                    options = {"granularity": granularity, "group_size": int(rng.integers(1, 70)),
                               "rounding": rounding, "seed": int(rng.integers(0, 2**63))}
                    if codec_name == "fp16" and np.abs(x).max() >= 65520:
                        continue
                    frame = codec.encode(x, codec_name, backend="c", **options)
                    assert frame == codec.encode(x, codec_name, backend="numpy", **options)
                    np.testing.assert_array_equal(bits(codec.decode(frame, backend="c")),
                                                  bits(codec.decode(frame, backend="numpy")))


def test_auto_backend_uses_c_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    calls: list[str] = []
    original = native.encode_int8

    def spy(*args: object) -> None:
        calls.append("c")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(native, "encode_int8", spy)
    codec.encode(np.linspace(-1, 1, 50, dtype=np.float32))
    assert calls == ["c"]


def run_harness(compiler: str, folder: Path, *, runner: tuple[str, ...] = ()) -> list[str]:
    """Build tests/native/codec_harness.c with csrc/ (statically, for qemu-user) and return its lines."""
    binary = folder / f"harness-{Path(compiler).name}"
    sources = [str(REPO / "tests" / "native" / "codec_harness.c"), str(REPO / "csrc" / "codec.c")]
    subprocess.run([compiler, "-static", "-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-fno-fast-math",
                    "-ffp-contract=off", f"-I{REPO / 'csrc'}", *sources, "-o", str(binary)], check=True)
    return subprocess.run([*runner, str(binary)], capture_output=True, text=True, check=True).stdout.splitlines()


def harness_line(run: int, num_scales: int, rounding: int) -> str:
    """The line tests/native/codec_harness.c prints for one layout, computed with the numpy reference."""
    index = np.arange(4100, dtype=np.uint64)
    x = ((index * 2654435761 % 2**32).astype(np.uint32).view(np.int32) >> 8).astype(np.float32) * np.float32(2**-20)
    fields = []
    for name, nbytes in (("int8", 4100), ("int4", 2050), ("int2", 1025)):
        scales, payload = np.empty(num_scales, np.float32), np.empty(nbytes, np.int8 if name == "int8" else np.uint8)
        getattr(reference, f"encode_{name}")(x, (4100, run, num_scales), scales, payload, codec.ROUNDINGS[rounding], 42)
        fingerprint = 0xCBF29CE484222325  # FNV-1a, as the harness computes it
        for byte in scales.tobytes() + payload.tobytes():
            fingerprint = (fingerprint ^ byte) * 0x100000001B3 % 2**64
        fields.append(f"{name} 0 {fingerprint:016x}")
    return f"encode run={run} rounding={rounding} " + " ".join(fields)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="cross-checks aarch64 from an x86-64 host")
def test_aarch64_build_matches_the_host(tmp_path: Path) -> None:
    """Cross-compile the codec for aarch64, run its int encoders under qemu-user, compare with the host's build
    and the numpy reference.

    Needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (apt-get install -y ...).
    """
    cross = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    host = shutil.which(os.environ.get("CC", "cc"))
    if cross is None or qemu is None or host is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu "
                    "libc6-dev-arm64-cross qemu-user)")
    expected = run_harness(host, tmp_path)
    layouts = [(4100, 1), (64, (4100 + 63) // 64), (1, 4), (205, 4)]  # the harness's runs
    assert expected == [harness_line(run, num_scales, rounding) for run, num_scales in layouts for rounding in (0, 1)]
    assert run_harness(cross, tmp_path, runner=(qemu,)) == expected
