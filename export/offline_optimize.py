"""The portable graphs as onnxruntime's basic optimizations leave them, folded once on the host.

A step traced from torch is 800-1,600 nodes, half of them constants, casts, reshapes and unsqueezes of
scalars and shapes that onnxruntime folds away whenever a session loads the graph (its basic level:
constant folding, redundant nodes, common subexpressions). Folded at export instead, a cnn-small block's
train graph has 446-706 nodes, a board's session starts without that work, and it holds 1.5-2.9 MiB
less: peak resident memory 1.4-2.5 MiB lower per cnn-small block (docs/results.md, "Step time"). Only the
basic level: its rewrites stay in standard ONNX ops that any onnxruntime and execution provider runs;
the higher levels write onnxruntime's own fused ops for the machine that folds.

onnxruntime runs a graph in a depth-first walk back from its outputs that takes a node's latest input
in the file first, and the export orders its nodes for that walk (a weight gradient's copies of the
input come before the gradient, so they are made last). onnxruntime saves the folded graph in its own
order; the nodes are put back in the exported order here, a node that onnxruntime made going right
after the latest producer of its inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from .in_place import topological

STANDARD_DOMAINS = ("", "ai.onnx")


def fold(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` after onnxruntime's basic optimizations, in ``model``'s node order where the folded graph allows;
    None where onnxruntime wrote a non-standard op (then the caller keeps ``model``)."""
    import onnxruntime

    from edgebll.runner import session_options

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "traced.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(source))
        options = session_options(1)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        folded = onnx.load(str(target))
    if any(node.domain not in STANDARD_DOMAINS for node in folded.graph.node):
        return None
    nodes = _in_order_of(list(folded.graph.node), {node.name: at for at, node in enumerate(model.graph.node)})
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    # onnxruntime declares every domain it knows; the graph uses the traced ones only
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    return folded


def _in_order_of(nodes: list[onnx.NodeProto], traced: dict[str, int]) -> list[onnx.NodeProto]:
    """``nodes`` in a topological order that follows their places in the traced graph (``traced``: name ->
    index) wherever their inputs allow: a node onnxruntime made (a name the trace does not have) goes right after
    the latest producer of its inputs, and a node that now reads a merged twin from later in the file (common
    subexpressions) waits for it."""
    producer = {name: at for at, node in enumerate(nodes) for name in node.output if name}
    keys: dict[int, tuple[int, int, int]] = {}

    def key(at: int) -> tuple[int, int, int]:
        if at not in keys:
            node = nodes[at]
            if node.name and node.name in traced:
                keys[at] = (traced[node.name], 0, at)
            else:
                parents = [key(producer[name])[0] for name in node.input if name in producer]
                keys[at] = (max(parents, default=-1), 1, at)
        return keys[at]

    order = topological(nodes, key)
    for at, node in enumerate(nodes):
        if not node.name:
            node.name = f"folded/{at}"
    return order
