"""Message codec throughput, C kernel vs numpy reference, and the extra memory each path allocates.

For message sizes from 4 KiB to 16 MiB (float32 activations shaped like [64, C, H, W]) it times
``edgebll.codec.encode`` and ``decode`` with ``backend="c"`` and ``backend="numpy"`` (median of
``--repeats`` calls after warmup, C and numpy calls interleaved) for every codec and scale granularity asked for (int codecs per
tensor, per channel and per group of 64; fp16 per tensor) and records, with tracemalloc, the peak
bytes allocated beyond the frame (encode) or the output array (decode). Both paths checksum the
frame with zlib.crc32 (its share is timed on its own as "zlib CRC ms"). Writes
benchmarks/results/codec_speed.{json,md}.

    python benchmarks/codec_speed.py [--repeats 15] [--codecs int8 int4 int2 fp16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table, other_processes_cpu, write_results  # noqa: E402

from edgebll import codec  # noqa: E402
from edgebll.codec.frame import FrameHeader  # noqa: E402

# [batch, channels, side, side] float32 messages: 4 KiB ... 16 MiB
SHAPES = [(64, 1, 4, 4), (64, 4, 8, 8), (64, 16, 16, 16), (64, 64, 16, 16), (64, 64, 32, 32)]


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median time of each call, timed in turn (one of each, `repeats` times).

    Interleaved, so that a load that other processes put on a shared machine lands on every call
    alike instead of on whichever was being timed at the moment: their ratios stay meaningful.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_extra_bytes(call: Callable[[], object], result_bytes: int) -> int:
    """Peak traced allocation during ``call`` minus the bytes of what it returns (frame or array)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return max(peak - result_bytes, 0)


GROUP_SIZE = 64
BACKENDS = ("c", "numpy")


def measure(shape: tuple[int, ...], name: str, granularity: str, repeats: int) -> list[dict]:
    """One row per backend ("c", then "numpy") for a message of `shape`, timed side by side."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    options = {"granularity": granularity, "group_size": GROUP_SIZE}
    frame = codec.encode(x, name, backend="c", **options)
    assert frame == codec.encode(x, name, backend="numpy", **options), "the backends must agree"
    out = np.empty_like(x)
    body = memoryview(frame)[FrameHeader.from_bytes(frame).nbytes :]
    encode = {b: (lambda b=b: codec.encode(x, name, backend=b, **options)) for b in BACKENDS}
    decode = {b: (lambda b=b: codec.decode(frame, out, backend=b)) for b in BACKENDS}
    encode_s, decode_s = median_seconds(encode, repeats), median_seconds(decode, repeats)
    crc_s = median_seconds({"zlib": lambda: zlib.crc32(body)}, repeats)["zlib"]
    return [{
        "shape": list(shape), "message_bytes": x.nbytes, "frame_bytes": len(frame), "codec": name,
        "granularity": granularity, "group_size": GROUP_SIZE if granularity == "group" else None, "backend": backend,
        "encode_ms": encode_s[backend] * 1e3, "decode_ms": decode_s[backend] * 1e3,
        "encode_gb_s": x.nbytes / encode_s[backend] / 1e9, "decode_gb_s": x.nbytes / decode_s[backend] / 1e9,
        "crc_ms": crc_s * 1e3,
        # the returned frame is the one allocation encode needs; count everything beyond it (and beyond `out`)
        "encode_extra_bytes": peak_extra_bytes(encode[backend], len(frame)),
        "decode_extra_bytes": peak_extra_bytes(decode[backend], 0),
    } for backend in BACKENDS]


def render(rows: list[dict], machine: dict) -> str:
    by_key = {(tuple(r["shape"]), r["codec"], r["granularity"], r["backend"]): r for r in rows}
    table = []
    for (shape, name, granularity, backend), row in by_key.items():
        if backend != "c":
            continue
        ref = by_key[(shape, name, granularity, "numpy")]
        scales = f"group {GROUP_SIZE}" if granularity == "group" else granularity
        table.append([f"{row['message_bytes'] / 1024:,.0f} KiB", name, scales, f"{row['frame_bytes'] / 1024:,.1f}",
                      f"{row['encode_ms']:.3f}", f"{ref['encode_ms']:.3f}", f"{ref['encode_ms'] / row['encode_ms']:.2f}",
                      f"{row['decode_ms']:.3f}", f"{ref['decode_ms']:.3f}", f"{ref['decode_ms'] / row['decode_ms']:.2f}",
                      f"{row['crc_ms']:.3f}",
                      f"{row['encode_extra_bytes'] / 1024:,.1f}", f"{row['decode_extra_bytes'] / 1024:,.1f}",
                      f"{ref['encode_extra_bytes'] / 1024:,.0f}", f"{ref['decode_extra_bytes'] / 1024:,.0f}"])
    headers = ["message", "codec", "scales", "frame KiB", "C encode ms", "numpy encode ms", "speed-up", "C decode ms",
               "numpy decode ms", "speed-up", "zlib CRC ms", "C encode extra KiB", "C decode extra KiB",
               "numpy encode extra KiB", "numpy decode extra KiB"]
    return (f"# Codec throughput, C vs numpy\n\nMachine: {describe_machine(machine)}; other processes kept "
            f"{machine.get('other_cores')} cores busy on average.\n"
            f"Command: `python benchmarks/codec_speed.py {' '.join(sys.argv[1:])}` · median of repeated calls, one run, "
            f"C and numpy calls interleaved. Times are whole `encode` / `decode` calls, zlib's CRC-32 included (timed "
            f"alone in \"zlib CRC ms\"); "
            f"\"extra\" is the peak traced allocation beyond the returned frame (encode) or `out` (decode).\n\n"
            + markdown_table(headers, table, "lllrrrrrrrrrrrr"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement (default: 15)")
    parser.add_argument("--codecs", nargs="+", default=["int8", "int4", "int2", "fp16"], choices=codec.CODECS,
                        help="codecs to measure (default: int8 int4 int2 fp16)")
    args = parser.parse_args(argv)
    if not codec.native_available():
        parser.error("the native codec library is not built; run `make setup` (or pip install -e .) first")
    int_codecs = {"int8", "int4", "int2"}
    jobs = [(s, c, g) for s in SHAPES for c in args.codecs
            for g in (("tensor", "channel", "group") if c in int_codecs else ("tensor",))]
    with other_processes_cpu() as others:
        rows = [row for job in tqdm(jobs, desc="codec", unit="case") for row in measure(*job, args.repeats)]
    machine = machine_info(("numpy",)) | {"other_cores": others.cores}
    json_path, md_path = write_results("codec_speed", {"machine": machine, "repeats": args.repeats, "rows": rows},
                                       render(rows, machine))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
