"""Where a portable training step spends its time: onnxruntime's profiler, op by op.

Exports a zoo model (bwbpf, 4 blocks, batch 64) and runs each block's ``portable_train.onnx`` on an
inference session with profiling on, as ``PortableRunner`` configures it. The kernel times of the
timed runs are summed per op type, and the single slowest nodes are listed with what they compute
(forward, input gradient or weight gradient of a convolution, read from the graph around it).

    python benchmarks/portable_ops.py                      # cnn-small, 2 threads
    python benchmarks/portable_ops.py --models resnet18 --threads 1
    python benchmarks/portable_ops.py --threads 1 2           # and how each op type scales to 2 threads

With several thread counts, a second table gives each op type's kernel time at each count and its
speed-up at the highest, and how much of the step goes to op types that onnxruntime does not
spread over the threads (speed-up under SCALES).

Writes benchmarks/results/portable_ops.json and .md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
from common import describe_machine, machine_info, markdown_table, write_results
from edgebll.export import export_model

from edgebll.manifest import load_block_manifest
from edgebll.portable import load_state, train_session_options
from edgebll.portable_schema import TRAIN_FILE
from edgebll.run_folder import block_dir_name

BLOCKS = 4
TOP_NODES = 8
SCALES = 1.1
"""An op type whose kernel time falls by less than this factor from the fewest to the most threads
is counted as not spread over the threads."""
SCALING_OPS = 10


def _role(node: dict, graph_inputs: set[str], consumers: dict[str, set[str]]) -> str:
    """What a convolution or matrix product computes in the step, from the graph around it."""
    op, inputs, name = node["op"], node["inputs"], node["name"]
    if op == "Conv" and len(inputs) > 1 and inputs[1] in graph_inputs:
        return "forward"
    if op == "ConvTranspose":
        return "input gradient"
    if op == "Conv":  # the weight gradient's convolution is cut to the kernel size by a Slice
        return "weight gradient" if "Slice" in consumers.get(name, set()) else "input gradient"
    if "MatMul" in op:
        return "weight gradient (per offset)" if name.startswith("node_mm") else "matrix product"
    return ""


def profile_block(block_dir: Path, *, threads: int, batch: int, runs: int, warmup: int) -> dict:
    """Per-op-type and per-node kernel milliseconds of one training step (mean over ``runs``)."""
    import onnx
    import onnxruntime

    manifest = load_block_manifest(block_dir, verify_files=False)
    options = train_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(block_dir / "ort_profile")
    session = onnxruntime.InferenceSession(str(block_dir / TRAIN_FILE), options, providers=["CPUExecutionProvider"])
    state = load_state(block_dir / "portable_state.npz", manifest.portable.state_keys(), str(block_dir))
    rng = np.random.default_rng(0)
    feeds: dict = dict(state)
    for spec in manifest.inputs:
        shape = (batch, *spec.per_sample_shape())
        feeds[spec.name] = (rng.integers(0, 10, shape).astype(np.int64) if spec.dtype == "int64"
                            else rng.standard_normal(shape).astype(spec.dtype))
    feeds["lr"], feeds["step"] = np.array(1e-3, np.float32), np.array(1, np.float32)
    for _ in range(warmup + runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    graph = onnx.load(str(block_dir / TRAIN_FILE)).graph
    graph_inputs = {i.name for i in graph.input}
    inputs_of = {n.name: list(n.input) for n in graph.node}
    producer = {out: n.name for n in graph.node for out in n.output}
    consumers: dict[str, set[str]] = collections.defaultdict(set)
    for n in graph.node:
        for name in n.input:
            if name in producer:
                consumers[producer[name]].add(n.op_type)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (warmup + runs)
    timed = kernels[warmup * per_run:]
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in timed:
        op, name = event["args"]["op_name"], event["name"][: -len("_kernel_time")]
        by_op[op] += event["dur"] / runs / 1000
        by_node[(op, name)] += event["dur"] / runs / 1000
    total = sum(by_op.values())
    nodes = [{"op": op, "name": name, "ms": round(ms, 2), "inputs": inputs_of.get(name.split("/")[0], [])}
             for (op, name), ms in sorted(by_node.items(), key=lambda t: -t[1])[:TOP_NODES]]
    for node in nodes:
        node["role"] = _role(node, graph_inputs, consumers)
    return {"block": block_dir.name, "kernel_ms": round(total, 1),
            "by_op": {op: round(ms, 2) for op, ms in sorted(by_op.items(), key=lambda t: -t[1])},
            "top_nodes": nodes}


def thread_scaling(rows: list[dict], few: int, many: int) -> dict:
    """Per block: each op type's kernel ms at ``few`` and ``many`` threads and its speed-up, and the
    share of the ``many``-thread kernel time in op types that did not speed up by SCALES. ``ops``: the
    SCALING_OPS op types with the most time at ``few`` threads over all blocks (the table's columns)."""
    pairs: dict[tuple[str, str], dict[int, dict]] = collections.defaultdict(dict)
    for r in rows:
        pairs[(r["model"], r["block"])][r["threads"]] = r
    time_at_few: dict[str, float] = collections.defaultdict(float)
    for r in (r for r in rows if r["threads"] == few):
        for op, ms in r["by_op"].items():
            time_at_few[op] += ms
    ops = sorted(time_at_few, key=lambda op: -time_at_few[op])[:SCALING_OPS]
    blocks = []
    for (model, block), by_threads in pairs.items():
        slow, fast = by_threads[few]["by_op"], by_threads[many]["by_op"]
        speedup = {op: slow[op] / fast[op] for op in slow if fast.get(op)}
        unspread = sum(fast[op] for op, x in speedup.items() if x < SCALES)
        blocks.append({"model": model, "block": block,
                       "unspread_percent": round(100 * unspread / by_threads[many]["kernel_ms"], 1),
                       "ops": {op: [round(slow[op], 2), round(fast[op], 2), round(speedup[op], 2)]
                               for op in ops if op in speedup}})
    return {"few": few, "many": many, "ops": ops, "blocks": blocks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn-small"], help="zoo models (default: cnn-small)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="ORT intra-op threads; several counts add the per-op scaling table (default: 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per block (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--name", default="portable_ops", help="results file stem (default: portable_ops)")
    args = parser.parse_args(argv)
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            run = export_model(model, out=Path(tmp) / model, blocks=BLOCKS, batch_size=args.batch_size, progress=False)
            for k in range(BLOCKS):
                for threads in args.threads:
                    result = profile_block(run / block_dir_name(k), threads=threads, batch=args.batch_size,
                                           runs=args.runs, warmup=args.warmup)
                    rows.append({"model": model, "threads": threads, **result})
                    print(f"{model} {result['block']}, {threads} thread(s): {result['kernel_ms']} ms", flush=True)
    machine = machine_info()
    ops = sorted({op for r in rows for op in r["by_op"]}, key=lambda op: -sum(r["by_op"].get(op, 0) for r in rows))[:8]
    table = markdown_table(["model", "block", "threads", "kernels ms", *[f"{op} %" for op in ops]],
                           [[r["model"], r["block"], r["threads"], r["kernel_ms"],
                             *[f"{100 * r['by_op'].get(op, 0) / r['kernel_ms']:.0f}" for op in ops]] for r in rows],
                           align="llrr" + "r" * len(ops))
    slowest = markdown_table(["model", "block", "threads", "op", "node", "what", "ms"],
                             [[r["model"], r["block"], r["threads"], n["op"], n["name"][:40], n["role"], n["ms"]]
                              for r in rows for n in r["top_nodes"][:3]], align="llrlllr")
    threads = " ".join(map(str, args.threads))
    markdown = (
        "# Where the portable step's time goes: onnxruntime's profiler\n\n"
        f"`python benchmarks/portable_ops.py --models {' '.join(args.models)} --threads {threads}` on "
        f"{describe_machine(machine)}. Each block of a {BLOCKS}-block bwbpf "
        f"split, batch {args.batch_size}, at {threads} thread(s): kernel time of one training step (mean of "
        f"{args.runs} after {args.warmup} warm-up steps), and each op type's share of it.\n\n" + table +
        "\n\nThe three slowest nodes of each block:\n\n" + slowest + "\n")
    scaling = thread_scaling(rows, min(args.threads), max(args.threads)) if len(set(args.threads)) > 1 else None
    if scaling:
        few, many = scaling["few"], scaling["many"]
        markdown += (
            f"\nEach op type's kernel ms at {few} → {many} threads and its speed-up (the {SCALING_OPS} op types "
            f"with the most time at {few}); \"unspread\": the share of the {many}-thread kernel time in op types "
            f"that sped up by less than {SCALES}×.\n\n"
            + markdown_table(["model", "block", "unspread %", *scaling["ops"]],
                             [[b["model"], b["block"], b["unspread_percent"],
                               *[f"{b['ops'][op][0]} → {b['ops'][op][1]} ({b['ops'][op][2]}×)" if op in b["ops"]
                                 else "—" for op in scaling["ops"]]] for b in scaling["blocks"]],
                             align="llr" + "r" * len(scaling["ops"])) + "\n")
    write_results(args.name, {"benchmark": "portable_ops", "machine": machine, "settings": vars(args),
                              "onnxruntime": onnxruntime.__version__, "rows": rows, "scaling": scaling}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
