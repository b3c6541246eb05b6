"""The portable graphs folded at export (``export/offline_optimize.py``): onnxruntime's basic optimizations,
standard ops only, the same outputs, the traced node order kept where the folded graph allows it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper

from edgebll.export.offline_optimize import _in_order_of, fold


def _traced() -> onnx.ModelProto:
    """``x·(2+3)`` twice (a common subexpression), each through a ReLU, summed; the constants' sum folds."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    nodes = [
        helper.make_node("Constant", [], ["c2"], value=two, name="const_2"),
        helper.make_node("Constant", [], ["c3"], value=three, name="const_3"),
        helper.make_node("Add", ["c2", "c3"], ["five"], name="add_consts"),
        helper.make_node("Mul", ["x", "five"], ["a"], name="mul_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Mul", ["x", "five"], ["b"], name="mul_b"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["ra", "rb"], ["y"], name="add_out"),
    ]
    graph = helper.make_graph(nodes, "traced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_leaves_fewer_standard_ops_that_compute_the_same() -> None:
    traced = _traced()
    folded = fold(traced)
    assert folded is not None
    ops = [n.op_type for n in folded.graph.node]
    assert "Constant" not in ops and len(ops) < len(traced.graph.node)
    assert ops.count("Mul") == 1  # the twins merged
    assert {n.domain for n in folded.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in folded.opset_import] == [("", 18)]
    onnx.checker.check_model(folded)
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -2.0, 0.0]], np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(traced, x))
    traced_at = {n.name: at for at, n in enumerate(traced.graph.node)}
    kept = [traced_at[n.name] for n in folded.graph.node if n.name in traced_at]
    assert kept == sorted(kept)


def test_order_follows_the_trace_but_waits_for_a_merged_twin_and_names_new_nodes() -> None:
    """``late`` (traced 5) now feeds ``early`` (traced 2), as a merged twin from further down the file would:
    ``early`` waits for it. The unnamed node onnxruntime made goes right after its input's producer."""
    nodes = [
        helper.make_node("Relu", ["early_out"], ["made_out"]),  # made by onnxruntime, unnamed
        helper.make_node("Neg", ["x"], ["first_out"], name="first"),
        helper.make_node("Relu", ["late_out"], ["early_out"], name="early"),
        helper.make_node("Abs", ["x"], ["late_out"], name="late"),
        helper.make_node("Add", ["first_out", "made_out"], ["y"], name="last"),
    ]
    traced = {"first": 0, "early": 2, "late": 5, "last": 9}
    ordered = _in_order_of(nodes, traced)
    assert [n.name for n in ordered] == ["first", "late", "early", "folded/0", "last"]
