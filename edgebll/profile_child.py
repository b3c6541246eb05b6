"""One measurement of ``edgebll profile``, taken in a fresh process that :mod:`edgebll.profiler` starts.

``python -m edgebll.profile_child block BLOCK`` trains the block for a few steps exactly as a device
would: the input arrives as a codec frame and is decoded, the block takes its step, the output is
encoded. It prints one JSON line: its peak resident memory (VmHWM) and the step times.
``python -m edgebll.profile_child baseline`` only imports what a block child imports before it
measures (numpy, edgebll's runtime, ONNX Runtime), so that the parent can subtract it.

With ``--cap`` the child runs under that RLIMIT_AS and, when the block does not fit, exits with
:data:`OOM_EXIT` and an "out of memory: ..." line on stderr.

Imports only the standard library at module level, and the runtime inside the functions: the cap
must be set before anything that maps memory is imported, and the runtime's imports are part of
what both children measure (:func:`import_runtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from edgebll.errors import EdgeBLLError

OOM_EXIT = 3
"""Exit status of a child that ran out of memory under its cap."""

_OOM_MARKERS = ("bad_alloc", "bad allocation", "failed to allocate", "cannot allocate memory", "memoryerror",
                "out of memory", "failed to map segment", "resource temporarily unavailable", "std::length_error")


def _status() -> dict[str, int]:
    """VmHWM (peak resident), VmRSS, VmPeak (peak virtual), VmSize, and RssAnon and RssFile (the resident
    memory in the heap, and in mapped files such as ONNX Runtime's code) of this process, in bytes."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "VmPeak", "VmSize", "RssAnon", "RssFile"):
                    values[key] = int(line.split()[1]) * 1024
    except OSError as exc:
        raise EdgeBLLError(f"profiling reads /proc/self/status, which this system lacks ({exc}); it needs Linux") from exc
    return values


def import_runtime() -> None:
    """What both the baseline child and a block child import before anything is measured."""
    import numpy  # noqa: F401

    from edgebll import codec  # noqa: F401
    from edgebll.backends import open_block  # noqa: F401
    from edgebll.ort_training import training_api, training_available

    if training_available():  # also for the portable backend: without the torch-free shim, the training
        training_api()         # build's onnxruntime/__init__ imports torch (+250 MB that a board never pays)
    import onnxruntime  # noqa: F401


def random_inputs(manifest: Any, batch: int, seed: int = 0) -> list[Any]:
    """Random inputs for every graph input of the block, by role: messages normal, labels in range."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = manifest.output("logits")
    classes = int(logits.shape[-1]) if logits is not None and isinstance(logits.shape[-1], int) else 10
    arrays = []
    for spec in manifest.inputs:
        shape = (batch, *[int(d) for d in spec.per_sample_shape()])
        if spec.dtype == "int64":
            arrays.append(rng.integers(0, classes, size=shape, dtype=np.int64))
        elif spec.role == "target":
            # one one-hot row per label: [B, classes], or [B, T, classes] for a sequence model's per-token targets
            arrays.append(np.eye(classes, dtype=np.float32)[rng.integers(0, classes, size=shape[:-1])])
        else:
            arrays.append(rng.standard_normal(shape, dtype=np.float32))
    return arrays


def measure_steps(block_dir: str, *, steps: int, threads: int, codec: str, batch_size: int | None, lr: float,
                  save: bool, mode: str = "train", backend: str = "auto") -> dict[str, Any]:
    """Train ``block_dir`` for ``steps`` steps as a device would (``mode`` "eval": run its eval graph
    instead, as ``edgebll eval`` does; "frozen": as a block of ``--freeze-blocks`` runs, loaded without
    its training graph); returns the measurements."""
    import_runtime()
    imported = _status()
    from edgebll import codec as message_codec
    from edgebll.backends import open_block

    runner = open_block(block_dir, threads=threads, load_trained=False, backend=backend, frozen=mode == "frozen")
    loaded = _status()
    manifest = runner.manifest
    batch = batch_size or manifest.batch_size
    arrays = random_inputs(manifest, batch)
    kind = getattr(manifest, "kind", "forward")
    if mode != "train" and kind != "forward":
        raise EdgeBLLError(f"{block_dir} is a {kind} block: only forward blocks are evaluated (BLL's feedback "
                           "blocks are not needed at test time)")
    # a block but the first receives its message as a frame (the one a neighbour would send)
    frame_in = message_codec.encode(arrays[0], codec) if (manifest.index > 0 or kind != "forward") else None
    if frame_in is not None:
        arrays[0] = None  # a device holds the frame it received and the message decoded from it, never the sender's
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        x = message_codec.decode(frame_in) if frame_in is not None else arrays[0]
        result = (runner.eval_step(x, *arrays[1:]) if mode == "eval" else runner.frozen_step(x, *arrays[1:])
                  if mode == "frozen" else runner.train_step(x, *arrays[1:], lr))
        frame_out = message_codec.encode(result.message, codec) if result.message is not None else None
        times.append(time.perf_counter() - began)
        del x, result, frame_out  # a device loop drops this step's buffers before the next message arrives
    if save:
        runner.save(epoch=0)
    end = _status()
    return {
        "index": manifest.index, "kind": kind, "mode": mode, "batch_size": batch, "steps": steps, "threads": threads,
        "codec": codec, "backend": runner.backend, "status_after_import": imported, "status_after_load": loaded, "status": end,
        "step_ms": round(1000 * statistics.median(times[1:] or times), 2), "first_step_ms": round(1000 * times[0], 2),
    }


def oom_message(index: int | None, estimate: int | None, cap: int, budget: int | None = None) -> str:
    """The "out of memory: block K needs ..., cap ..." line of a block that did not fit under ``cap``."""
    from edgebll.devices.profiles import format_bytes

    needs = f"needs about {format_bytes(estimate)}" if estimate else "needs more"
    limit = f"{format_bytes(budget)} (RLIMIT_AS {format_bytes(cap)})" if budget else f"{format_bytes(cap)} of address space"
    return f"out of memory: block {index if index is not None else '?'} {needs}, cap {limit}"


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _child_main(args: argparse.Namespace) -> int:
    # composed before the cap: once memory runs out, formatting the message could fail too
    message = oom_message(args.index, args.estimate, args.cap, args.budget) if args.cap else ""
    if args.cap:
        import resource

        # before any import that maps memory: everything this process ever maps counts
        resource.setrlimit(resource.RLIMIT_AS, (args.cap, args.cap))
    try:
        if args.what == "baseline":
            import_runtime()
            result: dict[str, Any] = {"status": _status()}
        else:
            result = measure_steps(args.block, steps=args.steps, threads=args.threads, codec=args.codec,
                                   batch_size=args.batch_size, lr=args.lr, save=args.save,
                                   mode=args.mode, backend=args.backend)
    except Exception as exc:
        if args.cap and _is_out_of_memory(exc):
            os.write(2, message.encode() + b"\n")
            try:
                os.write(2, f"  ({type(exc).__name__}: {str(exc)[:300]})\n".encode())
            except MemoryError:
                pass
            return OOM_EXIT
        raise
    print(json.dumps(result))
    return 0


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgebll.profile_child",
                                     description="One measurement in this process (used by `edgebll profile`).")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("baseline", help="import the runtime and report memory").add_argument("--cap", type=int, default=None)
    p = sub.add_parser("block", help="train one block for a few steps and report memory and step time")
    p.add_argument("block")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--codec", default="int8")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save", action="store_true", help="save trained/checkpoint at the end")
    p.add_argument("--mode", choices=("train", "eval", "frozen"), default="train",
                   help="train steps, the eval graph, or frozen steps (the eval graph, loaded without training state)")
    p.add_argument("--backend", default="auto", help="the runtime that trains the block (see edgebll.backends)")
    p.add_argument("--cap", type=int, default=None, help="RLIMIT_AS in bytes, set before anything is imported")
    p.add_argument("--estimate", type=int, default=None, help="estimated peak (for the out-of-memory message)")
    p.add_argument("--budget", type=int, default=None, help="resident budget the cap stands for (for the message)")
    p.add_argument("--index", type=int, default=None, help="block index (for the out-of-memory message)")
    return parser


if __name__ == "__main__":
    namespace = _child_parser().parse_args()
    for key, default in (("index", None), ("estimate", None), ("budget", None)):
        if not hasattr(namespace, key):
            setattr(namespace, key, default)
    sys.exit(_child_main(namespace))
