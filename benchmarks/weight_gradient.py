"""A strided convolution's weight gradient: as a convolution against products over its stride phases.

The portable export writes a weight gradient in one of two forms (``export/portable.py``): a convolution
of the channel-transposed input with the output gradient as kernel, or matrix products over the kernel
offsets, each offset's window a run of one stride phase of the padded input (SpaceToDepth). For each
strided convolution of cnn-small and resnet18 (the blocks' first convolutions, the 1×1 shortcuts and the
local heads), both forms run on onnxruntime's inference session as the portable runner sets it up, batch
64, at 1 and 2 threads, taking turns run by run; each ratio is the median of products / convolution over
the rounds. This is where ``_by_offsets``'s rule for strided convolutions comes from.

    python benchmarks/weight_gradient.py

Writes benchmarks/results/weight_gradient.json and .md (``--name`` to change).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from common import describe_machine, markdown_table, shape_sweep

from edgebll.export import folded_conv, portable, stride_phases
from edgebll.portable import train_session_options
from edgebll.portable_schema import OPSET

SHAPES = [(32, 64, 28, 3, 2), (64, 128, 28, 3, 2), (64, 128, 28, 1, 2), (64, 128, 14, 3, 2), (128, 256, 14, 3, 2),
          (128, 256, 14, 1, 2), (128, 128, 7, 3, 2), (128, 256, 7, 3, 2), (256, 512, 7, 3, 2), (256, 512, 7, 1, 2),
          (256, 128, 4, 3, 2)]
"""(input channels, filters, input height = width, kernel, stride), padding kernel // 2: cnn-small's and resnet18's
strided convolutions and shortcuts, and the conv heads of their blocks."""
FORMS = {"convolution": portable._weight_gradient_by_convolution, "phases": portable._weight_gradient_by_offsets}


def _graph(form: Callable[..., torch.Tensor], channels: int, filters: int, size: int, kernel: int,
           stride: int) -> bytes:
    """The ONNX graph of one weight gradient in ``form``, the batch axis symbolic."""
    from torch.export import Dim

    pad = kernel // 2
    shape = [filters, channels, kernel, kernel]

    class WeightGradient(torch.nn.Module):
        def forward(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            return form(grad, x, shape, [stride] * 2, [pad] * 2, [1, 1], 1)

    out = folded_conv.output_size(size, kernel, stride, pad)
    args = (torch.randn(11, channels, size, size), torch.randn(11, filters, out, out))
    batch = Dim("batch", min=2)
    with portable._quiet_exporter(), tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(WeightGradient(), args, dynamo=True, opset_version=OPSET,
                                    input_names=["x", "grad"], output_names=["dw"],
                                    dynamic_shapes=[{0: batch}, {0: batch}], optimize=False,
                                    custom_translation_table=stride_phases.TRANSLATIONS)
        program.save(str(Path(tmp) / "g.onnx"))
        return onnx.load(str(Path(tmp) / "g.onnx")).SerializeToString()


def time_shape(shape: tuple[int, int, int, int, int], *, threads: int, batch: int, rounds: int) -> dict:
    """Median milliseconds of the convolution form and the products / convolution ratio, interleaved."""
    channels, filters, size, kernel, stride = shape
    out = folded_conv.output_size(size, kernel, stride, kernel // 2)
    options = train_session_options(threads)  # as PortableRunner runs a step: spinning stops after each run
    options.log_severity_level = 3
    sessions = {name: onnxruntime.InferenceSession(_graph(form, *shape), options, providers=["CPUExecutionProvider"])
                for name, form in FORMS.items()}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((batch, channels, size, size), dtype=np.float32),
             "grad": rng.standard_normal((batch, filters, out, out), dtype=np.float32)}
    want = torch.nn.grad.conv2d_weight(torch.from_numpy(feeds["x"]), [filters, channels, kernel, kernel],
                                       torch.from_numpy(feeds["grad"]), stride=stride, padding=kernel // 2).numpy()
    for session in sessions.values():  # both forms compute torch's gradient
        np.testing.assert_allclose(session.run(None, feeds)[0], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    plain = np.array(times["convolution"])
    probe = (torch.empty(2, channels, size, size), torch.empty(2, filters, out, out))
    chosen = portable._by_offsets(probe[0], probe[1], [filters, channels, kernel, kernel], [stride] * 2, [1, 1], 1)
    return {"shape": list(shape), "threads": threads, "output": [out, out],
            "convolution_ms": round(float(np.median(plain)) * 1e3, 2),
            "phases_ratio": round(float(np.median(np.array(times["phases"]) / plain)), 3),
            "export_uses": "phases" if chosen else "convolution"}


def render(rows: list[dict], settings: dict, machine: dict) -> str:
    table = [[f"{r['shape'][0]}→{r['shape'][1]}", f"{r['shape'][2]}×{r['shape'][2]}",
              f"{r['shape'][3]}×{r['shape'][3]} /{r['shape'][4]}", f"{r['output'][0]}×{r['output'][1]}", r["threads"],
              r["convolution_ms"], r["phases_ratio"], r["export_uses"]] for r in rows]
    return (f"# A strided convolution's weight gradient: products over stride phases / convolution\n\n"
            f"`weight_gradient.py` on {describe_machine(machine)}. One weight gradient (padding kernel // 2), batch "
            f"{settings['batch']}, on onnxruntime's inference session as the portable runner sets it up; both forms "
            f"take turns, {settings['rounds']} rounds; each ratio is the median of products / convolution over the "
            "rounds (< 1: the products are faster). \"export uses\": the form `_by_offsets` chooses for the portable "
            "graph.\n\n"
            + markdown_table(["channels", "input map", "kernel /stride", "output", "threads", "convolution ms",
                              "phases / convolution", "export uses"], table, "llllrrrl"))


def main(argv: list[str] | None = None) -> None:
    shape_sweep(argv, description="Time a strided convolution's weight gradient as a convolution and "
                                  "as products over its stride phases, at 1 and 2 threads.",
                name="weight_gradient", shapes=SHAPES, time_shape=time_shape, render=render)


if __name__ == "__main__":
    main()
