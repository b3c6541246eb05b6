"""Let a portable train graph write its next state over the current one.

The portable backend binds each ``next:KEY`` output to the very buffer fed as ``KEY``, so a
block holds one copy of its parameters and optimizer state, not two. That is exact only if every
node that reads ``KEY`` runs before the node that writes ``next:KEY``. onnxruntime orders nodes
by data dependencies alone, and eagerly: a weight's update needs only that weight's gradient,
while the same layer's input-gradient convolution, which reads the weight, is a sibling of it,
so the update may run first (it did for cnn-small: weights off by 2·lr after one AdamW step).

:func:`order_updates_after_reads` adds the missing dependencies: every reader of a state tensor
that is not already an ancestor of its update feeds a zero that is added to ``lr``, which every
update reads. The zero is the sum of an empty slice of the reader's output, exactly 0 whatever
the values, and costs nothing to compute. The updates then run after the backward. What only
the updates need and reads no state (AdamW's denominator, from the next ``exp_avg_sq``) does not
feed that barrier (:func:`_from_next_state`): it runs with the updates instead of being held
through the backward. A gradient does not wait for the barrier either: the moment updates, which
need no ``lr``, consume it as soon as it is made.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import onnx
from onnx import TensorProto, helper

from edgebll.portable_schema import NEXT

_LR = "lr"
_STEP = "step"
_ORDERED_LR = "lr_after_reads"
_TYPE_ONLY_INPUTS = {"CastLike": {1}}
"""Inputs that carry only a type: onnxruntime drops such a CastLike, and the edge with it."""
_SHAPE_OPS = {"Shape", "Size"}
"""Their outputs may be folded into constants where shapes are static: no dependency survives."""


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    skip = _TYPE_ONLY_INPUTS.get(node.op_type, set())
    return [name for at, name in enumerate(node.input) if name and at not in skip]


def _ancestors(node: int, producer: dict[str, int], nodes: list[onnx.NodeProto], memo: dict[int, frozenset[int]]) -> frozenset[int]:
    """Every node whose output ``nodes[node]`` depends on through data (not through shapes alone)."""
    found: set[int] = set()
    stack = [node]
    while stack:
        at = stack.pop()
        if at in memo and at != node:
            found |= memo[at]
            continue
        if nodes[at].op_type in _SHAPE_OPS and at != node:
            continue
        for name in _data_inputs(nodes[at]):
            parent = producer.get(name)
            if parent is not None and parent not in found:
                found.add(parent)
                stack.append(parent)
    memo[node] = frozenset(found)
    return memo[node]


def update_hazards(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Per state key: the nodes that read ``KEY`` but need not run before the node that writes ``next:KEY``.

    Empty when the graph may update its state in place. A ``next:KEY`` that is ``KEY`` passed
    through unchanged (an Identity, or the input itself) is no hazard: it writes what is there.
    """
    nodes = list(model.graph.node)
    producer = {name: at for at, node in enumerate(nodes) for name in node.output if name}
    readers: dict[str, list[int]] = {}
    for at, node in enumerate(nodes):
        for name in set(node.input):
            readers.setdefault(name, []).append(at)
    memo: dict[int, frozenset[int]] = {}
    hazards: dict[str, list[str]] = {}
    for output in model.graph.output:
        if not output.name.startswith(NEXT):
            continue
        key = output.name[len(NEXT):]
        writer = producer.get(output.name)
        if writer is None or (nodes[writer].op_type == "Identity" and list(nodes[writer].input) == [key]):
            continue
        before = _ancestors(writer, producer, nodes, memo)
        late = [nodes[r].name or nodes[r].op_type for r in readers.get(key, []) if r != writer and r not in before]
        if late:
            hazards[key] = late
    return hazards


def _zero_from(name: str, tag: str) -> list[onnx.NodeProto]:
    """Nodes computing ``{tag}`` = [0.0] (float, shape [1]) from tensor ``name``: the sum of an empty slice of it."""
    return [
        helper.make_node("Reshape", [name, f"{tag}/flat_shape"], [f"{tag}/flat"], name=f"{tag}/flatten"),
        helper.make_node("Slice", [f"{tag}/flat", f"{tag}/none", f"{tag}/none"], [f"{tag}/empty"], name=f"{tag}/slice"),
        helper.make_node("Cast", [f"{tag}/empty"], [f"{tag}/empty_f"], to=TensorProto.FLOAT, name=f"{tag}/cast"),
        # keepdims: onnxruntime's CUDA kernel refuses to reduce a dimension of size 0 away
        helper.make_node("ReduceSum", [f"{tag}/empty_f"], [tag], keepdims=1, name=f"{tag}/sum"),
    ]


def _constants(tag: str) -> Iterable[onnx.TensorProto]:
    yield helper.make_tensor(f"{tag}/flat_shape", TensorProto.INT64, [1], [-1])
    yield helper.make_tensor(f"{tag}/none", TensorProto.INT64, [1], [0])


def _from_next_state(model: onnx.ModelProto, nodes: list[onnx.NodeProto], updates: set[int]) -> set[int]:
    """The nodes that only the updates need and that compute from the next state and ``step`` alone (AdamW's
    denominator ``sqrt(v') / sqrt(1 - beta2^step) + eps``): nothing the updates must wait for reads them,
    so they need not run before the barrier, and held from there to the end they would keep one tensor
    the size of each weight alive through the backward."""
    outputs = {o.name for o in model.graph.output}
    fed = {i.name for i in model.graph.input} - {_STEP}
    # a Constant's output is free to read anywhere: as an initializer
    produced = {name: at for at, node in enumerate(nodes) for name in node.output if name and node.input}
    users: dict[str, list[int]] = {}
    for at, node in enumerate(nodes):
        for name in node.input:
            users.setdefault(name, []).append(at)
    deferred = {at for at in range(len(nodes)) if at not in updates}
    changed = True
    while changed:
        changed = False
        for at in sorted(deferred):
            node = nodes[at]
            inputs_ok = all(name not in fed and (name in outputs or produced.get(name) is None
                                                 or produced[name] in deferred) for name in node.input if name)
            users_ok = all(user in updates or user in deferred for name in node.output for user in users.get(name, []))
            if not (inputs_ok and users_ok) or outputs.intersection(node.output) or not node.output:
                deferred.discard(at)
                changed = True
    return deferred


def order_updates_after_reads(model: onnx.ModelProto) -> bool:
    """Make every optimizer update of ``model`` wait for all the rest of the step (see the module doc).

    The updates are the nodes that depend on ``lr``; every node that does not waits for none of
    them, so making ``lr`` wait for the sinks of the rest orders the whole step before any update,
    whatever onnxruntime's optimizer later fuses or rewires there. Edits ``model`` in place.
    Returns True when no hazard is left, so the state may be updated in place; False when one is:
    the runner then keeps two copies of the state.
    """
    nodes = list(model.graph.node)
    updates: set[int] = set()
    tainted = {_LR}
    for at, node in enumerate(nodes):  # a torch-traced graph is topologically sorted
        if tainted.intersection(node.input):
            updates.add(at)
            tainted.update(node.output)
    if not updates:
        return not update_hazards(model)
    after = updates | _from_next_state(model, nodes, updates)  # what runs after the barrier
    consumed = {name for at, node in enumerate(nodes) if at not in after for name in node.input}
    sinks = [at for at, node in enumerate(nodes)
             if at not in after and node.output and not consumed.intersection(node.output)
             and node.op_type not in _SHAPE_OPS]
    added: list[onnx.NodeProto] = []
    zeros = []
    for at, sink in enumerate(sinks):
        tag = f"after_reads/{at}"
        added += _zero_from(nodes[sink].output[0], tag)
        model.graph.initializer.extend(_constants(tag))
        zeros.append(tag)
    added.append(helper.make_node("Sum", zeros, ["after_reads/zeros"], name="after_reads/sum"))
    added.append(helper.make_node("Reshape", ["after_reads/zeros", "after_reads/scalar_shape"], ["after_reads/zero"],
                                  name="after_reads/scalar"))
    model.graph.initializer.append(helper.make_tensor("after_reads/scalar_shape", TensorProto.INT64, [0], []))
    added.append(helper.make_node("Add", [_LR, "after_reads/zero"], [_ORDERED_LR], name="after_reads/lr"))
    for at in updates:
        node = nodes[at]
        for k, name in enumerate(node.input):
            if name == _LR:
                node.input[k] = _ORDERED_LR
    del model.graph.node[:]
    model.graph.node.extend(topological([*nodes, *added]))
    return not update_hazards(model)


def topological(nodes: list[onnx.NodeProto],
                key: Callable[[int], Any] | None = None) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every node follows the producers of its inputs (ONNX requires it); of the
    nodes whose inputs are ready, the one with the smallest ``key(index)`` first (by default, as given)."""
    rank = key or (lambda at: at)
    producer = {name: at for at, node in enumerate(nodes) for name in node.output if name}
    waiting = [{producer[n] for n in node.input if n in producer} for node in nodes]
    users: dict[int, list[int]] = {}
    for at, parents in enumerate(waiting):
        for parent in parents:
            users.setdefault(parent, []).append(at)
    ready = [(rank(at), at) for at, parents in enumerate(waiting) if not parents]
    heapq.heapify(ready)
    order = []
    while ready:
        _, at = heapq.heappop(ready)
        order.append(nodes[at])
        for user in users.get(at, []):
            waiting[user].discard(at)
            if not waiting[user]:
                heapq.heappush(ready, (rank(user), user))
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order
