"""The memory a block's ONNX graph needs at a batch size: its state, and the liveness peak of its tensors.

:func:`graph_memory` sizes every tensor with ONNX shape inference (ORT's own com.microsoft ops by
the rules of :func:`_contrib_shape`), then walks the nodes in the order ORT runs them and keeps
the most bytes alive at once. :func:`edgebll.memory.estimate_peak_bytes` builds its estimate on it.

Needs the ``onnx`` package, imported when a graph is read: it is no dependency of the device
runtime (a board with plain onnxruntime installs it only for estimates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgebll.errors import EdgeBLLError, ManifestError
from edgebll.manifest import BlockManifest
from edgebll.portable_schema import NEXT

_ACCUMULATION_SUFFIX = "_grad.accumulation.buffer"
_ALIASING_OPS = {"InPlaceAccumulatorV2"}
"""Ops whose output is their first input, updated in place (no new memory)."""
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
"""Ops whose output shares its first input's buffer (onnxruntime declares them aliasing)."""


@dataclass(slots=True)
class GraphMemory:
    """Bytes of one graph at one batch size, by what they hold."""

    parameters: int = 0
    gradients: int = 0
    """ORT's gradient accumulation buffers (a portable graph has none)."""
    optimizer_state: int = 0
    """The optimizer-state inputs of a portable graph (ORT keeps its own outside the graph)."""
    peak: int = 0
    """The most bytes of intermediate tensors alive at once."""
    saved: int = 0
    """What the forward keeps for the backward, at the first backward node."""
    guessed: list[str] = field(default_factory=list)
    """Tensors whose shape inference failed and that were sized like their op's first input."""


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise EdgeBLLError(f"estimating memory reads the training graph with the onnx package ({exc}); hint: "
                           "pip install 'onnx>=1.16' (onnxruntime-training depends on it)") from exc
    return onnx


def graph_memory(path: Path, manifest: BlockManifest, batch: int,
                 optimizer_keys: frozenset[str] | None = None, in_place: bool = False) -> GraphMemory:
    """Parameters, gradient buffers and the liveness peak of the training graph at ``batch``.

    ``optimizer_keys``: a portable graph's optimizer-state inputs (its other inputs but lr and step
    are parameters and buffers; it has no gradient buffers). ``in_place``: its ``next:KEY`` outputs
    are written into the buffers of the ``KEY`` inputs and cost nothing more.
    """
    onnx = _import_onnx()
    if not path.is_file():
        raise ManifestError(f"block {manifest.index}: {path} is missing; hint: re-export the run")
    model = onnx.load(str(path), load_external_data=False)
    shapes, guessed = _infer_shapes(onnx, model, batch)
    graph = model.graph
    fed = {t.name for t in manifest.inputs}

    def nbytes(name: str) -> int:
        shape, itemsize = shapes[name]
        return math.prod(shape) * itemsize

    result = GraphMemory(guessed=guessed)
    for tensor in graph.input:
        if tensor.name in fed or tensor.name not in shapes or (optimizer_keys is not None and ":" not in tensor.name):
            continue  # (a portable graph's other inputs are lr and step, scalars)
        if optimizer_keys is not None and tensor.name in optimizer_keys:
            result.optimizer_state += nbytes(tensor.name)
        elif tensor.name.endswith(_ACCUMULATION_SUFFIX):
            result.gradients += nbytes(tensor.name)
        elif tensor.name != "lazy_reset_grad":  # a flag input of ORT's, not a parameter
            result.parameters += nbytes(tensor.name)

    nodes = _depth_first_order(list(graph.node)) if optimizer_keys is not None else _execution_order(list(graph.node))
    # a view op's output is its input's buffer (onnxruntime's kernels alias them): the buffer lives
    # until the last use of any of its views, and costs nothing more
    root: dict[str, str] = {}
    for node in nodes:
        if node.op_type in VIEW_OPS and node.input and node.input[0]:
            root[node.output[0]] = root.get(node.input[0], node.input[0])
    last_use: dict[str, int] = {}
    for at, node in enumerate(nodes):
        for name in node.input:
            if name:
                last_use[root.get(name, name)] = at
    outputs = {root.get(o.name, o.name) for o in graph.output}
    inputs = {t.name for t in graph.input}
    written_over = {o.name for o in graph.output if in_place and o.name.startswith(NEXT) and o.name[len(NEXT):] in inputs}
    backward = next((at for at, n in enumerate(nodes) if any(name.endswith("_grad") for name in n.input)), len(nodes))
    live: dict[str, int] = {}
    in_use = peak = 0
    for at, node in enumerate(nodes):
        if at == backward:
            result.saved = sum(size for name, size in live.items() if last_use.get(name, -1) >= backward)
        if node.op_type not in _ALIASING_OPS:
            for name in node.output:
                if name and name not in live and name not in root and name not in written_over:
                    live[name] = nbytes(name)
                    in_use += live[name]
        peak = max(peak, in_use)
        for name in {root.get(n, n) for n in node.input}:
            if name in live and last_use[name] == at and name not in outputs:
                in_use -= live.pop(name)
    result.peak = peak
    return result


def _depth_first_order(nodes: list[Any]) -> list[Any]:
    """The nodes in onnxruntime's default order: a depth-first walk back from the nodes whose outputs no
    node reads, each node placed after its inputs' producers, the latest in the file walked first.

    A portable step interleaves forward, backward and optimizer nodes that the file's order keeps
    apart (the copies a weight gradient needs are traced before the gradient they meet, so that this
    walk makes them last), so its liveness peak is taken in this order.
    """
    producer = {name: at for at, node in enumerate(nodes) for name in node.output if name}
    inputs = [sorted({producer[name] for name in node.input if name in producer}) for node in nodes]
    read = {name for node in nodes for name in node.input}
    leaves = [at for at, node in enumerate(nodes) if not read.intersection(name for name in node.output if name)]
    placed = [False] * len(nodes)
    order: list[Any] = []
    stack = [(at, False) for at in sorted(leaves)]
    while stack:
        at, done = stack.pop()
        if done:
            order.append(nodes[at])
            continue
        if placed[at]:
            continue
        placed[at] = True
        stack.append((at, True))
        stack.extend((parent, False) for parent in inputs[at] if not placed[parent])
    return order


def _execution_order(nodes: list[Any]) -> list[Any]:
    """The nodes as ORT runs them: each gradient accumulation right after the node producing its input.

    ORT's topological order does this (seen in the optimized graph it can save), so a weight's
    gradient never outlives its accumulation into the buffer.
    """
    produced = {name for n in nodes for name in n.output}
    moved = {n.input[1]: n for n in nodes if n.op_type in _ALIASING_OPS and len(n.input) > 1 and n.input[1] in produced}
    ordered = []
    for node in nodes:
        if node.op_type in _ALIASING_OPS and len(node.input) > 1 and node.input[1] in moved:
            continue
        ordered.append(node)
        ordered.extend(moved[name] for name in node.output if name in moved)
    return ordered


def _infer_shapes(onnx: Any, model: Any, batch: int) -> tuple[dict[str, tuple[list[int], int]], list[str]]:
    """Shape and item size of every tensor of the training graph at ``batch``.

    ONNX shape inference knows the standard ops; ORT's own (com.microsoft) ops are sized by the
    rules of :func:`_contrib_shape`, and inference runs again from them until nothing changes.
    """
    from onnx import helper, shape_inference

    work = onnx.ModelProto()
    work.CopyFrom(model)
    for value in list(work.graph.input) + list(work.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = batch  # the only symbolic dimension of an exported block is the batch
    shapes: dict[str, tuple[list[int], int]] = {}
    guessed: list[str] = []
    for _ in range(64):  # each round resolves at least one more tensor; graphs need a handful
        try:
            inferred = shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
        except Exception as exc:  # onnx raises its own InferenceError subclasses, not EdgeBLLErrors
            raise EdgeBLLError(f"ONNX shape inference failed on the training graph: {exc}") from exc
        for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tensor = value.type.tensor_type
            if value.name in shapes or not tensor.HasField("shape"):
                continue
            if all(d.HasField("dim_value") for d in tensor.shape.dim):
                shapes[value.name] = ([d.dim_value for d in tensor.shape.dim], _elem_size(helper, tensor.elem_type))
        for init in inferred.graph.initializer:
            shapes.setdefault(init.name, (list(init.dims), _elem_size(helper, init.data_type)))
        if _evaluate_shape_arithmetic(work, shapes):
            continue
        # exact rules first; a guess (like the first input) only when they are exhausted, since
        # inference from the tensors they size may still get the rest right
        added = _apply(_contrib_shape, work.graph.node, shapes) or _apply(_guess_shape, work.graph.node, shapes)
        if not added:
            break
        guessed += [name for name, guess in added if guess]
        work.graph.value_info.extend(helper.make_tensor_value_info(name, _ELEM_TYPES_BY_SIZE.get(shapes[name][1], 1),
                                                                   shapes[name][0]) for name, _ in added)
    for node in work.graph.node:  # whatever is still unknown: an empty tensor, and say so
        for name in node.output:
            if name and name not in shapes:
                shapes[name] = ([0], 4)
                guessed.append(name)
    return shapes, guessed


_SHAPE_ARITHMETIC = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a // b, "Mod": lambda a, b: a % b,
}
"""Integer ops of shape computations that ONNX's data propagation does not follow (a batch padded to a
multiple: ``export/folded_conv.py``)."""
_SHAPE_MOVES = {
    "Squeeze": lambda a, axes=None: np.squeeze(a, axis=None if axes is None else tuple(int(v) for v in axes)),
    "Unsqueeze": lambda a, axes: np.expand_dims(a, tuple(int(v) for v in axes)),
    "Reshape": lambda a, shape: a.reshape([int(v) for v in shape]),
}
"""Moves of int64 values between shapes (the batch size taken from ``Shape(x)`` as a scalar, multiplied into
a Reshape's target: ``export/portable.py``'s stride phases)."""


_SHAPE_CONSTANT_SIZE = 16
"""int64 initializers up to this many values are read as shape constants."""


def _evaluate_shape_arithmetic(work: Any, shapes: _Shapes) -> bool:
    """Replace each shape computation whose operands are now known by a Constant of its value, so that the
    next round of shape inference sizes the tensors it shapes (a Pad by a computed amount). Follows
    Shape, Constant, int64 initializers, Concat and :data:`_SHAPE_ARITHMETIC` on int64 values; True if any node was replaced."""
    from onnx import TensorProto, helper, numpy_helper

    onnx_int64 = TensorProto.INT64
    # a graph folded at export holds its shape constants as initializers (small ones: shapes, axes, scalars)
    values: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in work.graph.initializer
                              if init.data_type == onnx_int64 and math.prod(init.dims) <= _SHAPE_CONSTANT_SIZE}
    replaced = False
    for at, node in enumerate(work.graph.node):
        op, value = node.op_type, None
        if op == "Constant":
            attribute = node.attribute[0]
            if attribute.name in ("value_ints", "value_int"):
                values[node.output[0]] = np.array(helper.get_attribute_value(attribute), np.int64)
            elif attribute.name == "value" and attribute.t.data_type == onnx_int64:
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
            continue
        if op == "Shape" and node.input[0] in shapes:
            attrs = {a.name: a.i for a in node.attribute}
            dims = shapes[node.input[0]][0]
            value = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
        elif op == "Concat" and all(name in values for name in node.input):
            value = np.concatenate([values[name] for name in node.input])
        elif op in _SHAPE_ARITHMETIC and all(name in values for name in node.input):
            value = _SHAPE_ARITHMETIC[op](values[node.input[0]], values[node.input[1]]).astype(np.int64)
        elif op in _SHAPE_MOVES and all(name in values for name in node.input if name):
            value = _SHAPE_MOVES[op](*[values[name] if name else None for name in node.input])
        if value is not None:
            values[node.output[0]] = value
            work.graph.node[at].CopyFrom(helper.make_node("Constant", [], [node.output[0]],
                                                           value=numpy_helper.from_array(value, node.output[0])))
            replaced = True
    return replaced


_ELEM_TYPES_BY_SIZE = {1: 3, 2: 10, 4: 1, 8: 7}  # int8, float16, float32, int64: only the size matters here


def _elem_size(helper: Any, elem_type: int) -> int:
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


_Shapes = dict[str, tuple[list[int], int]]


def _apply(rule: Any, nodes: Any, shapes: _Shapes) -> list[tuple[str, bool]]:
    """Size every unknown output that ``rule`` can size; returns (name, guessed) of each."""
    added = []
    for node in nodes:
        for at, name in enumerate(node.output):
            if name and name not in shapes:
                found = rule(node, at, shapes)
                if found is not None:
                    shapes[name] = found
                    added.append((name, rule is _guess_shape))
    return added


def _input(node: Any, k: int, shapes: _Shapes) -> tuple[list[int], int] | None:
    return shapes.get(node.input[k]) if k < len(node.input) and node.input[k] else None


def _contrib_shape(node: Any, at: int, shapes: _Shapes) -> tuple[list[int], int] | None:
    """(shape, item size) of output ``at`` of an ORT op that ONNX inference does not know."""
    op = node.op_type
    if op in _ALIASING_OPS or op == "Scale":  # Scale: x times a scalar
        return _input(node, 0, shapes)
    if op == "BatchNormInternal":  # y, running mean, running var, saved mean, saved inverse std
        return _input(node, 0 if at == 0 else 1, shapes)
    if op == "BatchNormalizationGrad":  # dX, dScale, dBias
        return _input(node, 1 if at == 0 else 2, shapes)
    if op == "ConvGrad":  # dX, dW, dB
        weight = _input(node, 2, shapes)
        if at == 2:
            return ([weight[0][0]], weight[1]) if weight else None
        return _input(node, 1, shapes) if at == 0 else weight
    name = node.output[at]
    if name.endswith("_grad"):  # ORT names the gradient of tensor t "t_grad"
        return shapes.get(name[: -len("_grad")])
    return None


def _guess_shape(node: Any, at: int, shapes: _Shapes) -> tuple[list[int], int] | None:
    """Last resort: an op ONNX cannot size is taken to be elementwise (true of most gradient ops)."""
    return _input(node, 0, shapes)
