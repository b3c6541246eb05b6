"""One convolution on onnxruntime with its weights fed, with its weights constant, and on torch.

A training graph feeds its weights (they change every step), and onnxruntime runs a Conv with fed weights
on MLAS's NCHW path (expand, then matrix product); a Conv whose weights are a constant initializer is
rewritten at load time into MLAS's NCHWc kernels (x86 only), the path an inference graph gets. torch
eager runs the same convolution on oneDNN. For stride-1 3×3 convolutions on 28×28 and 14×14 maps (cnn-small's
and resnet18's first stages, and a 256-channel map that the portable graph would run folded:
``benchmarks/folded_conv.py``), the three take turns run by run (``step_speed.time_interleaved``: a
pause before each timed run, so torch's spinning OpenMP workers do not slow the next run), batch 64, at
1 and 2 threads; each ratio is the median over the rounds of the two runs' ratio in one round.

    python benchmarks/conv_kernels.py

Writes benchmarks/results/conv_kernels.json and .md (``--name`` to change).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from common import describe_machine, markdown_table, shape_sweep
from onnx import TensorProto, helper, numpy_helper
from step_speed import round_ratio, time_interleaved

from edgebll.portable import train_session_options
from edgebll.portable_schema import OPSET

SHAPES = [(32, 32, 28), (64, 64, 28), (64, 64, 14), (128, 128, 14), (256, 256, 14)]
"""(channels, filters, height = width), 3×3 kernel, stride 1, padding 1: cnn-small's first and second
stages, resnet18's layer1 and layer2, and 256 channels at 14×14 (more filters than positions: the portable
graph folds that one, this times it plain)."""


def _graph(channels: int, filters: int, size: int, weight: np.ndarray | None) -> bytes:
    """A Conv whose weights are the input ``w`` (``weight`` None) or the constant ``weight``."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])]
    if weight is None:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [filters, channels, 3, 3]))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", filters, size, size])],
                              [] if weight is None else [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def time_shape(shape: tuple[int, int, int], *, threads: int, batch: int, rounds: int) -> dict[str, Any]:
    """Median milliseconds of the fed-weight Conv, and constant / fed and torch / fed, interleaved."""
    channels, filters, size = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
    w = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    options = train_session_options(threads)  # as PortableRunner runs a step
    options.log_severity_level = 3
    fed = onnxruntime.InferenceSession(_graph(channels, filters, size, None), options, providers=["CPUExecutionProvider"])
    constant = onnxruntime.InferenceSession(_graph(channels, filters, size, w), options,
                                            providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    want = torch.nn.functional.conv2d(tx, tw, padding=1).numpy()
    for got in (fed.run(None, {"x": x, "w": w})[0], constant.run(None, {"x": x})[0]):  # all three compute one conv
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    timings = time_interleaved({
        "fed": lambda: fed.run(None, {"x": x, "w": w}),
        "constant": lambda: constant.run(None, {"x": x}),
        "torch": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
    }, warmup=3, repeats=rounds)
    flops = 2 * batch * size * size * filters * channels * 9
    fed_s = float(np.median(timings["fed"].steps_s))
    return {"shape": list(shape), "threads": threads, "fed_ms": round(fed_s * 1e3, 2),
            "fed_gflops": round(flops / fed_s / 1e9, 1),
            "constant_ratio": round_ratio(timings["constant"], timings["fed"]),
            "torch_ratio": round_ratio(timings["torch"], timings["fed"])}


def render(rows: list[dict[str, Any]], settings: dict[str, Any], machine: dict[str, Any]) -> str:
    table = [[f"{r['shape'][0]}→{r['shape'][1]}", f"{r['shape'][2]}×{r['shape'][2]}", r["threads"], r["fed_ms"],
              r["fed_gflops"], r["constant_ratio"], r["torch_ratio"]] for r in rows]
    return (f"# One convolution: onnxruntime with fed weights, with constant weights, and torch\n\n"
            f"`conv_kernels.py` on {describe_machine(machine)}. A 3×3 convolution, stride 1, padding 1, batch "
            f"{settings['batch']}, on onnxruntime's inference session as the portable runner sets it up: weights "
            "fed as an input (what a training graph runs: MLAS's NCHW path) or constant (rewritten into MLAS's "
            "NCHWc kernels at load time), and torch eager (oneDNN); the three take turns, "
            f"{settings['rounds']} rounds, a pause before each timed run; each ratio is the median over the rounds "
            "of the two runs' ratio in one round (< 1: faster than the fed-weight Conv).\n\n"
            + markdown_table(["channels", "map", "threads", "fed ms", "fed GFLOP/s", "constant / fed", "torch / fed"],
                             table, "llrrrrr"))


def main(argv: list[str] | None = None) -> None:
    shape_sweep(argv, description="Time one convolution on onnxruntime with its weights fed and constant, and "
                                  "on torch, at 1 and 2 threads.",
                name="conv_kernels", shapes=SHAPES, time_shape=time_shape, render=render)


if __name__ == "__main__":
    main()
