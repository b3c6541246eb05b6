"""Where a portable training step's memory goes: every allocation of one step, named by its node.

One block's step runs in a child process under ``strace`` with onnxruntime's arena off and glibc's
mmap threshold at 64 KiB, so every tensor is a mapping of its own; onnxruntime's profiler names the
node that was running when each mapping appeared. Beside it, a liveness walk of the same optimized
graph in the order onnxruntime ran it (sizes from the profiler): where the two differ, onnxruntime
holds memory the graph does not need (its buffer-reuse plan did, see docs/results.md "Step time").

    python benchmarks/alloc_timeline.py RUN/block-0               # needs strace (apt install strace)
    python benchmarks/alloc_timeline.py RUN/block-2 --reuse       # onnxruntime's buffer reuse on

Writes benchmarks/results/alloc_timeline.json and .md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import describe_machine, machine_info, markdown_table, write_results
from edgebll.graph_memory import VIEW_OPS
from edgebll.portable_schema import TRAIN_FILE

MARK_START, MARK_END = "ALLOC_TIMELINE_START", "ALLOC_TIMELINE_END"
_MMAP = re.compile(r"^\d+\s+([\d.]+) mmap\(NULL, (\d+),.*= (0x[0-9a-f]+)")
_MUNMAP = re.compile(r"^\d+\s+([\d.]+) munmap\((0x[0-9a-f]+), (\d+)\)")
_ITEMSIZE = {"float": 4, "double": 8}
"""Item bytes of the profiler's type names that numpy reads otherwise (bool, int64, float16 it reads alike)."""
MIB = 2**20


def parse_trace(lines: list[str]) -> dict[str, Any]:
    """The mappings made and not yet unmapped between the two marks of an ``strace -ttt`` log: their
    peak (bytes), its time and what was live then (``[seconds after the start mark, bytes]``)."""
    start = end = None
    live: dict[str, tuple[float, int]] = {}
    total = peak = 0
    peak_at, peak_live = 0.0, []
    for line in lines:
        if MARK_START in line:
            start = float(line.split()[1])
            continue
        if start is None:
            continue
        if MARK_END in line:
            end = float(line.split()[1])
            break
        if match := _MMAP.match(line):
            at, size = float(match.group(1)) - start, int(match.group(2))
            live[match.group(3)] = (at, size)
            total += size
            if total > peak:
                peak, peak_at, peak_live = total, at, sorted(live.values())
        elif (match := _MUNMAP.match(line)) and match.group(2) in live:
            total -= live.pop(match.group(2))[1]
    if start is None or end is None:
        raise ValueError(f"the trace has no {MARK_START}/{MARK_END} pair: the child did not finish its step")
    return {"peak_bytes": peak, "peak_s": peak_at, "live": [list(item) for item in peak_live],
            "step_s": end - start, "left_bytes": total}


def liveness(order: list[dict[str, Any]], graph_outputs: set[str]) -> list[dict[str, int]]:
    """Per node of ``order`` (``name``, ``inputs``, ``outputs``: {name: bytes}, ``view``): the bytes of
    every buffer alive while it runs, a view sharing its input's buffer; graph outputs live to the end."""
    root: dict[str, str] = {}
    for node in order:
        for name in node["outputs"]:
            first = node["inputs"][0] if node["inputs"] else None
            root[name] = root.get(first, first) if node["view"] and first in root else name
    last: dict[str, int] = {}
    for at, node in enumerate(order):
        for name in node["inputs"]:
            if name in root:
                last[root[name]] = at
    for name in graph_outputs:
        if name in root:
            last[root[name]] = len(order)
    alive: dict[str, int] = {}
    result = []
    for at, node in enumerate(order):
        alive.update({name: size for name, size in node["outputs"].items() if root[name] == name})
        result.append(dict(alive))
        for name in [n for n in alive if last.get(n, at) <= at]:
            del alive[name]
    return result


def _child(args: argparse.Namespace) -> None:
    """Train the block ``args.steps`` steps with the portable runner, marks around the last."""
    from edgebll import portable

    configure = portable.train_session_options

    def options(threads: int) -> Any:
        chosen = configure(threads)
        chosen.enable_cpu_mem_arena = False  # every tensor its own allocation, so its own mapping
        if args.reuse:
            chosen.enable_mem_reuse = True
        chosen.enable_profiling = True
        chosen.profile_file_prefix = str(args.out / "profile")
        chosen.optimized_model_filepath = str(args.out / "optimized.onnx")
        return chosen

    portable.train_session_options = options
    runner = portable.PortableRunner(args.block, threads=args.threads, load_trained=False)
    rng = np.random.default_rng(0)
    x_spec, side_spec = runner.manifest.inputs[:2]
    x = rng.random((args.batch_size, *x_spec.per_sample_shape())).astype(x_spec.dtype)
    side = rng.integers(0, 2, size=(args.batch_size, *side_spec.per_sample_shape())).astype(side_spec.dtype)
    for step in range(args.steps):
        last = step == args.steps - 1
        if last:
            os.write(2, f"{MARK_START}\n".encode())
        runner.train_step(x, side, 1e-3)
        if last:
            os.write(2, f"{MARK_END}\n".encode())
    print(json.dumps({"profile": runner.train_session.end_profiling()}))


def _ran_order(profile: list[dict[str, Any]], optimized: Any) -> list[dict[str, Any]]:
    """The nodes of the last run in the order they ran, with their outputs' bytes."""
    run = [e for e in profile if e.get("cat") == "Session" and e.get("name") == "model_run"][-1]
    events = sorted((e for e in profile if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                     and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]), key=lambda e: e["ts"])
    nodes = {node.name: node for node in optimized.graph.node}
    order = []
    for event in events:
        name = event["name"][:-len("_kernel_time")]
        node = nodes.get(name)
        if node is None:  # a node onnxruntime added after it saved the optimized model (a Cast): unsized
            continue
        types = [next(iter(s.items())) for s in event["args"].get("output_type_shape", [])]
        outputs = {o: (_ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize) * math.prod(dims)
                   for o, (dtype, dims) in zip(node.output, types) if o}
        order.append({"name": name, "op": node.op_type, "inputs": list(node.input), "outputs": outputs,
                      "view": node.op_type in VIEW_OPS, "start_us": event["ts"] - run["ts"]})
    return order


def measure(block: Path, *, threads: int, batch_size: int, steps: int, reuse: bool) -> dict[str, Any]:
    """Trace one step of ``block`` and compare its allocations with the liveness walk."""
    import onnx

    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("alloc_timeline needs strace; hint: apt-get install strace")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        command = [strace, "-f", "-ttt", "-e", "trace=mmap,munmap,write", "-o", str(out / "trace.txt"),
                   sys.executable, __file__, str(block), "--child", "--out", str(out), "--threads", str(threads),
                   "--batch-size", str(batch_size), "--steps", str(steps)] + (["--reuse"] if reuse else [])
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the traced step failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        traced = parse_trace((out / "trace.txt").read_text().splitlines())
        profile = json.loads(Path(json.loads(done.stdout.splitlines()[-1])["profile"]).read_text())
        optimized = onnx.load(str(out / "optimized.onnx"), load_external_data=False)
    order = _ran_order(profile, optimized)
    walk = liveness(order, {o.name for o in optimized.graph.output})

    def node_at(seconds: float) -> int:
        started = [at for at, node in enumerate(order) if node["start_us"] <= seconds * 1e6]
        return started[-1] if started else 0

    at_peak = node_at(traced["peak_s"])
    walk_peak = max(range(len(walk)), key=lambda at: sum(walk[at].values()))
    producer = {o: at for at, node in enumerate(order) for o in node["outputs"]}
    return {
        "block": str(block), "threads": threads, "batch_size": batch_size, "buffer_reuse": reuse,
        "step_ms": traced["step_s"] * 1e3, "peak_mib": traced["peak_bytes"] / MIB, "peak_node": order[at_peak]["name"],
        "walk_at_peak_node_mib": sum(walk[at_peak].values()) / MIB,
        "walk_peak_mib": sum(walk[walk_peak].values()) / MIB, "walk_peak_node": order[walk_peak]["name"],
        "measured_live": [{"allocated_ms": t * 1e3, "mib": size / MIB, "node": order[node_at(t)]["name"],
                           "op": order[node_at(t)]["op"]} for t, size in traced["live"]],
        "walk_live": sorted(({"tensor": name, "mib": size / MIB, "node": order[producer[name]]["name"],
                              "op": order[producer[name]]["op"]} for name, size in walk[at_peak].items()),
                            key=lambda row: -row["mib"]),
    }


def _markdown(result: dict[str, Any], machine: dict[str, Any], top: int) -> str:
    big = lambda rows: [r for r in rows if r["mib"] >= 0.05][:top]  # noqa: E731
    measured = sorted(big(sorted(result["measured_live"], key=lambda r: -r["mib"])), key=lambda r: r["allocated_ms"])
    return "\n".join([
        "# One training step's allocations against its liveness walk", "",
        f"`alloc_timeline.py {result['block']}` on {describe_machine(machine)}. Batch {result['batch_size']}, "
        f"{result['threads']} thread(s), onnxruntime's buffer reuse {'on' if result['buffer_reuse'] else 'off'}, "
        "arena off (each tensor its own mapping; a traced step runs several times slower).", "",
        f"Allocations peak at **{result['peak_mib']:.1f} MiB** above the step's start, while `{result['peak_node']}` "
        f"runs; a liveness walk of the optimized graph in the order onnxruntime ran it holds "
        f"{result['walk_at_peak_node_mib']:.1f} MiB there, and peaks at {result['walk_peak_mib']:.1f} MiB at "
        f"`{result['walk_peak_node']}`.", "",
        "Buffers live at the measured peak (the node running when each was mapped; onnxruntime may have "
        "handed it to a later tensor since):", "",
        markdown_table(["mapped at ms", "MiB", "node", "op"],
                       [[f"{r['allocated_ms']:.1f}", f"{r['mib']:.2f}", r["node"], r["op"]] for r in measured]),
        "", "Tensors the walk holds at that node:", "",
        markdown_table(["MiB", "tensor", "made by", "op"],
                       [[f"{r['mib']:.2f}", r["tensor"], r["node"], r["op"]] for r in big(result["walk_live"])]), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Trace every allocation of one portable training step of an "
                                     "exported block (strace, onnxruntime's arena off) and compare it with a "
                                     "liveness walk of the graph in onnxruntime's order. Writes "
                                     "benchmarks/results/<name>.json and .md.")
    parser.add_argument("block", type=Path, help="an exported block folder (RUN/block-K) with portable graphs")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples in the step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="steps run; the last is traced (default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="run with onnxruntime's buffer reuse on (its default; "
                        "the portable backend turns it off)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default: %(default)s)")
    parser.add_argument("--name", default="alloc_timeline", help="results file stem (default: %(default)s)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 2 or args.threads < 1:
        parser.error("--steps and --batch-size must be at least 2 and --threads at least 1")
    if args.child:
        _child(args)
        return
    if not (args.block / TRAIN_FILE).is_file():
        parser.error(f"{args.block} has no {TRAIN_FILE}; hint: give a block folder of a run exported with "
                     "`edgebll export` (portable graphs are the default)")
    result = measure(args.block, threads=args.threads, batch_size=args.batch_size, steps=args.steps, reuse=args.reuse)
    machine = machine_info()
    json_path, md_path = write_results(args.name, {"machine": machine, **result}, _markdown(result, machine, args.top))
    print(f"peak {result['peak_mib']:.1f} MiB, walk {result['walk_at_peak_node_mib']:.1f} MiB at the same node; "
          f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
