"""A convolution with more filters than output positions: plain against folded (``export/folded_conv.py``).

For each shape, the plain ONNX Conv and the fold of ``group`` samples side by side (the graph the
portable export writes, for several groups) run on onnxruntime's inference session, batch 64, at
1 and 2 threads, taking turns run by run; each ratio is the median of folded / plain over the rounds.
This is where ``fold_group``'s choices come from: which maps fold and how many samples go side by side.

    python benchmarks/folded_conv.py

Writes benchmarks/results/folded_conv.json and .md (``--name`` to change).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from common import describe_machine, markdown_table, shape_sweep

from edgebll.export.portable import _quiet_exporter
from edgebll.portable import train_session_options
from edgebll.portable_schema import OPSET
from edgebll.export import folded_conv

SHAPES = [(64, 128, 7, 7, 3, 1), (128, 128, 7, 7, 3, 1), (128, 64, 7, 7, 3, 1), (128, 256, 7, 7, 3, 1),
          (256, 256, 7, 7, 3, 1), (256, 512, 4, 4, 3, 1), (512, 512, 4, 4, 3, 1), (512, 256, 4, 4, 3, 1),
          (64, 128, 14, 14, 3, 2), (128, 256, 14, 14, 3, 2), (128, 256, 14, 14, 1, 2), (128, 256, 7, 7, 3, 2),
          (256, 512, 7, 7, 1, 2)]
"""(input channels, filters, height, width, kernel, stride): cnn-small's third and fourth stages and resnet18's
layer3 and layer4, forwards and input gradients, and their strided first convolutions and shortcuts; padding
kernel // 2."""
GROUPS = (2, 4, 8, 16, 32)


def _graph(channels: int, filters: int, height: int, width: int, kernel: int, stride: int, group: int | None) -> bytes:
    """The ONNX graph of one convolution (padding ``kernel // 2``), plain (``group`` None) or folded as the export
    folds it."""
    from torch.export import Dim

    class Convolution(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            if group is None:
                return torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel // 2)
            return folded_conv.folded_conv2d(x, w, [stride] * 2, [kernel // 2] * 2, group)

    args = (torch.randn(11, channels, height, width), torch.randn(filters, channels, kernel, kernel))
    with _quiet_exporter(), tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(Convolution(), args, dynamo=True,
                                    opset_version=OPSET, input_names=["x", "w"], output_names=["y"],
                                    dynamic_shapes=[{0: Dim("batch", min=2)}, None], optimize=False,
                                    custom_translation_table=folded_conv.TRANSLATIONS)
        program.save(str(Path(tmp) / "g.onnx"))
        return onnx.load(str(Path(tmp) / "g.onnx")).SerializeToString()


def time_shape(shape: tuple[int, int, int, int, int, int], *, threads: int, batch: int, rounds: int) -> dict:
    """Median milliseconds of the plain convolution and folded/plain ratios per group, interleaved."""
    channels, filters, height, width, kernel, stride = shape
    pad = kernel // 2
    out_height, out_width = (folded_conv.output_size(size, kernel, stride, pad) for size in (height, width))
    columns = folded_conv.span(width, pad, stride) // stride
    options = train_session_options(threads)  # as PortableRunner runs a step: spinning stops after each run
    options.log_severity_level = 3
    groups = [g for g in GROUPS if out_height * g * columns >= filters and batch // g >= 2]
    sessions = {g: onnxruntime.InferenceSession(_graph(channels, filters, height, width, kernel, stride, g), options,
                                                providers=["CPUExecutionProvider"]) for g in [None, *groups]}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((batch, channels, height, width), dtype=np.float32),
             "w": rng.standard_normal((filters, channels, kernel, kernel), dtype=np.float32) * 0.1}
    want = sessions[None].run(None, feeds)[0]
    for g in groups:  # the fold computes the same convolution
        np.testing.assert_allclose(sessions[g].run(None, feeds)[0], want, rtol=1e-4, atol=1e-3)
    times: dict[int | None, list[float]] = {g: [] for g in sessions}
    for _ in range(rounds):
        for g, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[g].append(time.perf_counter() - start)
    plain = np.array(times[None])
    return {"shape": list(shape), "threads": threads, "plain_ms": round(float(np.median(plain)) * 1e3, 2),
            "ratios": {str(g): round(float(np.median(np.array(times[g]) / plain)), 3) for g in groups},
            "chosen_group": folded_conv.fold_group(filters, out_height, out_width, columns) if stride == 1 else None}


def render(rows: list[dict], settings: dict, machine: dict) -> str:
    table = [[f"{r['shape'][0]}→{r['shape'][1]}", f"{r['shape'][2]}×{r['shape'][3]}",
              f"{r['shape'][4]}×{r['shape'][4]}" + (f" /{r['shape'][5]}" if r["shape"][5] > 1 else ""), r["threads"],
              r["plain_ms"],
              *[r["ratios"].get(str(g), "—") for g in GROUPS], r["chosen_group"] or "plain"] for r in rows]
    return (f"# A convolution with more filters than positions: folded / plain\n\n`folded_conv.py` on "
            f"{describe_machine(machine)}. One convolution (padding kernel // 2), batch {settings['batch']}, on onnxruntime's "
            f"inference session as the portable runner sets it up; plain and each fold take turns, {settings['rounds']} rounds; each ratio is the median "
            "of folded / plain over the rounds (< 1: the fold is faster). \"export folds\": the group "
            "`fold_group` chooses for the portable graph (which folds stride-1 convolutions only).\n\n"
            + markdown_table(["channels", "input map", "kernel /stride", "threads", "plain ms", *[f"{g} side by side" for g in GROUPS],
                              "export folds"], table, "lllrr" + "r" * len(GROUPS) + "r"))


def main(argv: list[str] | None = None) -> None:
    shape_sweep(argv, description="Time a convolution with more filters than output positions, "
                                  "plain against folded (several samples side by side), at 1 and 2 threads.",
                name="folded_conv", shapes=SHAPES, time_shape=time_shape, render=render)


if __name__ == "__main__":
    main()
