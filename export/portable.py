"""The portable training step: one ONNX graph of standard ``ai.onnx`` ops per block.

The maintained ``onnxruntime`` (aarch64 wheels, Jetson's GPU build) has no training API and
refuses ORT's training graphs (com.microsoft gradient and optimizer ops). A portable step graph
needs neither: torch traces the whole step — forward, local loss, ``torch.autograd.grad``, the
optimizer update and BatchNorm's running statistics — with ``make_fx`` into core ATen ops, and
the dynamo ONNX exporter translates those. Two backward ops have no ONNX translation and are
decomposed here into forward ops (``convolution_backward``: ConvTranspose and Conv;
``max_pool2d_with_indices_backward``: torch's scatter-add decomposition). A "same" convolution with more
filters than output positions runs on several samples side by side (:mod:`.folded_conv`), which
onnxruntime threads where it would not thread the convolution as it is. Both graphs are written as
onnxruntime's basic optimizations fold them, in the traced node order (:mod:`.offline_optimize`).

Graph contract (names in :mod:`edgebll.portable`): inputs ``x``, the side input, ``lr``, ``step``
and every state tensor ``param:NAME``, ``buffer:NAME``, ``exp_avg:NAME``, ``exp_avg_sq:NAME``;
outputs the block's own outputs (loss first) and the updated state under ``next:KEY``, computed
after everything else so that the runner may write it over the state it was fed (:mod:`.in_place`). The eval
graph takes ``x``, the side input and the ``param:``/``buffer:`` state, and returns the block's
outputs in eval mode. The batch axis is symbolic in both.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch._decomp import core_aten_decompositions, get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from edgebll.errors import ExportError
from edgebll.portable_schema import (
    EVAL_FILE, NEXT, OPSET, STATE_FILE, TRAIN_FILE, PortableSchema, buffer_key, exp_avg_key, exp_avg_sq_key,
    param_key,
)
from edgebll.portable import save_state

from .artifacts import GraphInput, OptimizerConfig, example_input
from . import folded_conv, offline_optimize, stride_phases
from .in_place import order_updates_after_reads, update_hazards
from .pool_gradients import adaptive_avg_pool2d_backward, avg_pool2d_backward

aten = torch.ops.aten

_MIN_BATCH = 2  # BatchNorm's batch statistics need two samples
_MIN_GEMM_CHANNELS = 16  # below this the per-offset products are too thin: one product of every offset's window
_MIN_BATCHED_POSITIONS = 100  # output positions from which per-sample products beat one product per offset
_PHASE_FLOATS_PER_SAMPLE = 16384  # a strided weight gradient's padded input per channel group and sample (4 MiB at batch 64)


def convolution_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                         output_padding: Sequence[int], groups: int,
                         output_mask: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """``aten.convolution_backward`` in forward convolutions, which ONNX has (Conv, ConvTranspose).

    - input gradient: the transposed convolution of the output gradient with the same weight; the
      output padding restores the rows a strided convolution dropped. At stride 1 the same as a
      convolution with the kernel flipped and its channels exchanged.
    - weight gradient: matrix products over the kernel offsets where :func:`_by_offsets` says so
      (``_weight_gradient_by_offsets``), otherwise a convolution (``_weight_gradient_by_convolution``).
    - bias gradient: the output gradient summed over every axis but the channels.
    """
    if transposed:
        raise NotImplementedError("the portable export has no gradient for transposed convolutions (nn.ConvTranspose1d/2d/3d) yet")
    dims = input.dim() - 2
    spatial = list(range(2, 2 + dims))
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        flipped = [dilation[i] * (weight.shape[2 + i] - 1) - padding[i] for i in range(dims)]
        if all(v == 1 for v in stride) and all(v >= 0 for v in flipped):
            # a Conv of the flipped, transposed kernel: onnxruntime's Conv runs this 1.5× faster than its ConvTranspose
            c_out, c_in_group = weight.shape[0], weight.shape[1]
            kernel = weight.reshape(groups, c_out // groups, c_in_group, *weight.shape[2:]).transpose(1, 2)
            kernel = kernel.reshape(groups * c_in_group, c_out // groups, *weight.shape[2:]).flip(spatial)
            grad_input = aten.convolution(grad_output, kernel, None, stride, flipped, dilation, False, [0] * dims, groups)
        else:
            dropped = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                             + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(dims)]
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, dropped, groups)
    if output_mask[1]:
        gradient = (_weight_gradient_by_offsets if _by_offsets(input, grad_output, weight.shape, stride, dilation, groups)
                    else _weight_gradient_by_convolution)
        grad_weight = gradient(grad_output, input, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *spatial])
    return grad_input, grad_weight, grad_bias


def _weight_gradient_by_convolution(grad_output: torch.Tensor, input: torch.Tensor, shape: Sequence[int],
                                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                    groups: int) -> torch.Tensor:
    """A convolution's weight gradient as a convolution whose "batch" is the input's channels and whose kernel
    is the output gradient (channels and batch swapped), stride and dilation exchanged, cut to the kernel
    size (the padded input's end rows that no offset reads are not padded on, which took 3-11 % off the step
    of single stride-2 conv blocks); groups stay groups (each group's samples are one group of channels)."""
    dims = input.dim() - 2
    n, c_in, c_out = input.shape[0], input.shape[1], grad_output.shape[1]
    samples = input.reshape(n, groups, c_in // groups, *input.shape[2:])
    samples = samples.permute(2, 1, 0, *[3 + i for i in range(dims)]).reshape(c_in // groups, groups * n,
                                                                               *input.shape[2:])
    kernel = grad_output.reshape(n, groups, c_out // groups, *grad_output.shape[2:])
    kernel = kernel.permute(1, 2, 0, *[3 + i for i in range(dims)]).reshape(c_out, n, *grad_output.shape[2:])
    # the rows of the padded input past the last one any kernel offset reads would only give outputs
    # beyond the kernel size (a stride-2 3×3 conv: 4×4 computed for 3×3): pad the end short instead
    spans = [dilation[i] * (shape[2 + i] - 1) + stride[i] * (grad_output.shape[2 + i] - 1) + 1 for i in range(dims)]
    ends = [spans[i] - padding[i] - input.shape[2 + i] for i in range(dims)]
    if any(ends[i] < padding[i] for i in range(dims)) and all(v >= 0 for v in ends):
        samples = torch.nn.functional.pad(samples, [v for i in reversed(range(dims)) for v in (padding[i], ends[i])])
        padding = [0] * dims
    full = aten.convolution(samples, kernel, None, dilation, padding, stride, False, [0] * dims, groups)
    full = full[(slice(None), slice(None), *[slice(0, shape[2 + i]) for i in range(dims)])]
    return full.transpose(0, 1)


def _by_offsets(input: torch.Tensor, grad_output: torch.Tensor, shape: Sequence[int], stride: Sequence[int],
                dilation: Sequence[int], groups: int) -> bool:
    """Whether a weight gradient runs as matrix products over the kernel offsets rather than as a convolution.

    At stride 1 whenever there are 2+ input channels (groups 1). Strided (2-D, one stride for both axes,
    dilation 1, 16+ input channels): where the output has ``_MIN_BATCHED_POSITIONS``+ positions or the kernel
    is 1×1 (``python benchmarks/weight_gradient.py``, batch 64: 0.80-0.96× the convolution's time on 14×14
    outputs; 1×1 shortcuts, whose window is a quarter of the input, 0.16-0.22× on 7×7 and 14×14 outputs and
    0.61-0.66× on 4×4). On 7×7 outputs of larger kernels the products ran 0.88-0.91× but their copies of the
    whole input held 4-6 MiB more of a cnn-small block's step resident; on 4×4 they were 1.2-1.3× slower.
    """
    if groups != 1 or input.shape[1] < 2:
        return False
    if all(v == 1 for v in stride):
        return True
    return (input.dim() == 4 and stride[0] == stride[1] and all(v == 1 for v in dilation)
            and input.shape[1] >= _MIN_GEMM_CHANNELS
            and (math.prod(grad_output.shape[2:]) >= _MIN_BATCHED_POSITIONS or math.prod(shape[2:]) == 1))


def _weight_gradient_by_offsets(grad_output: torch.Tensor, input: torch.Tensor, shape: Sequence[int],
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                groups: int = 1) -> torch.Tensor:
    """A convolution's weight gradient as matrix products over the kernel offsets (``groups`` 1 only: the
    argument is there for the same signature as :func:`_weight_gradient_by_convolution`).

    Each offset's slice of the gradient is the padded input shifted by that offset (every ``stride``-th
    position from there) times the output gradient, summed over samples and positions. Two layouts, by
    the output's size (MLAS, batch 64, two threads, cnn-small's blocks):

    - large outputs (``_MIN_BATCHED_POSITIONS``+ positions, and strided kernels larger than 1×1): one
      product per sample, ``[C_in, positions] × [positions, C_out]``, summed over the samples. The products split over
      the samples, so they use every thread: 0.6× the time of the one-product form on 14×14 and
      28×28 outputs, whose ``[C_out, C_in]`` result is too small to thread. Under 16 input channels
      the products are too thin: every offset's window goes into one product (an im2col).
    - small outputs (stride 1, or a strided 1×1): one ``[C_out, N·positions] × [N·positions, C_in]`` product
      per offset, on the input with channels first; per sample, 7×7 outputs made products too small and the
      sum over samples as long as the products, and the per-sample results (``N × C_in × C_out``) are large
      (32 MiB for resnet18's 256 → 512 shortcut).

    At stride 1 the windows are crops of the input. Windows of the map with its spatial axes flattened
    (one run per channel, copied 6× faster than onnxruntime's row-by-row Slice of a 7×7 window) made
    no step faster there: the products over the runs' extra columns took what the copies saved. Strided,
    a window's rows are every ``stride``-th one, which onnxruntime copies element by element (a crop of
    a transposed 6-D view ran 2.5× the convolution's time): there the padded input is split into its
    stride phases (:mod:`.stride_phases`, in channel groups) and a window is one run of a phase plane, the
    output gradient padded with the plane's extra columns; a 1×1 kernel's window is one strided Slice.
    """
    dims = input.dim() - 2
    n, c_out, c_in = input.shape[0], shape[0], shape[1]
    kernel = list(shape[2:])
    out = list(grad_output.shape[2:])
    strided = any(v != 1 for v in stride)

    def windows(t: torch.Tensor) -> Iterator[torch.Tensor]:
        """``t`` shifted by each kernel offset, offsets in row-major order, zero where the shift reads the
        padding: one Pad per offset whose negative amounts crop, so no padded copy of the whole map and
        no intermediate slices are held (the offset that reads ``t`` as it is copies nothing)."""
        size = t.shape[2:]
        for offset in itertools.product(*[range(k) for k in kernel]):
            before = [padding[i] - offset[i] * dilation[i] for i in range(dims)]
            after = [out[i] - size[i] - before[i] for i in range(dims)]
            if any(before) or any(after):
                yield torch.nn.functional.pad(t, [v for i in reversed(range(dims)) for v in (before[i], after[i])])
            else:
                yield t

    if strided:  # the stride phases' planes (2-D, one stride: _by_offsets)
        block = stride[0]
        columns = out[1] + (kernel[1] - 1) // block
        rows = out[0] + (kernel[0] - 1) // block
        last = [(kh // block, kw // block) for kh, kw in itertools.product(range(kernel[0]), range(kernel[1]))
                if kh % block == block - 1 and kw % block == block - 1]
        if any((a + out[0]) * columns + b > rows * columns for a, b in last):
            rows += 1
        spans = [block * rows, block * columns]

    def phase_runs(t: torch.Tensor, lo: int, hi: int) -> Iterator[torch.Tensor]:
        """Strided windows of channels ``lo:hi`` of ``t`` as ``[N, hi - lo, out_h·columns]`` runs of its stride
        phases. One Pad takes the channels and pads the maps; each ``[H, W]`` map is then split on its own (as
        a one-channel image), so a map's phases lie one after the other and a window is one Slice of the last
        axis. Each phase plane is ``columns`` wide (the output's columns and the offsets' reach past them). A
        run may end a few elements into the next plane, values that meet the output gradient's zero columns;
        a row is added only where the last plane's would end past the map."""
        after = [spans[i] - padding[i] - t.shape[2 + i] for i in range(2)]
        pads = [padding[1], after[1], padding[0], after[0], -lo, hi - t.shape[1]]
        part = torch.nn.functional.pad(t, pads) if any(pads) else t
        maps = part.reshape(part.shape[0] * part.shape[1], 1, *spans)
        plane = rows * columns
        runs = stride_phases.space_to_depth(maps, block).reshape(part.shape[0], part.shape[1], block * block * plane)
        for kh, kw in itertools.product(range(kernel[0]), range(kernel[1])):
            start = (kh % block * block + kw % block) * plane + kh // block * columns + kw // block
            yield runs[:, :, start:start + out[0] * columns]

    def subsampled(t: torch.Tensor, lo: int, hi: int) -> Iterator[torch.Tensor]:
        """A 1×1 kernel's one window without padding: every ``stride``-th row and column, one Slice."""
        yield t[:, :, 0:stride[0] * out[0]:stride[0], 0:stride[1] * out[1]:stride[1]]

    def whole(t: torch.Tensor, lo: int, hi: int) -> Iterator[torch.Tensor]:
        return windows(t)

    cut, widen, chunks = whole, (lambda g: g), [(0, c_in)]
    if strided and kernel == [1, 1] and not any(padding):
        cut = subsampled
    elif strided:
        cut = phase_runs
        if columns > out[1]:  # the output gradient gets the planes' extra columns as zeros
            widen = lambda g: torch.nn.functional.pad(g, [0, columns - out[1]])  # noqa: E731
        # channels in groups whose padded maps and phases stay small: the head's gradient comes first in the
        # backward, while every activation of the block is held, and two copies of the whole input on top
        # of them took 11 MiB more of resnet18's first block (onnxruntime's arena; 2 MiB in groups)
        channel_groups = max(1, min(c_in // _MIN_GEMM_CHANNELS, -(-c_in * math.prod(spans) // _PHASE_FLOATS_PER_SAMPLE)))
        size = -(-c_in // channel_groups)
        chunks = [(lo, min(lo + size, c_in)) for lo in range(0, c_in, size)]

    # Every copy of the input is traced before the output gradient is touched: onnxruntime's execution
    # order walks back from the outputs taking a node's latest-traced input first, so it now runs the
    # backward that the gradient needs before these copies, not holding them through it
    # (cnn-small's first block: 12 MiB off the step's liveness peak).
    if math.prod(out) < _MIN_BATCHED_POSITIONS and c_in >= _MIN_GEMM_CHANNELS and cut is not phase_runs:
        if cut is subsampled:  # the quarter of the input that the 1×1 kernel reads, then channels first
            shifted = [w.transpose(0, 1).reshape(c_in, -1).t() for w in subsampled(input, 0, c_in)]
        else:
            shifted = [w.reshape(c_in, -1).t() for w in windows(input.transpose(0, 1))]
        grads = grad_output.transpose(0, 1).reshape(c_out, -1)  # [C_out, N·positions]
        products = [aten.mm(grads, w) for w in shifted]
        return torch.stack(products, -1).reshape(c_out, c_in, *kernel)
    if c_in >= _MIN_GEMM_CHANNELS:
        parts, grads = [], None
        for lo, hi in chunks:
            shifted = [w.reshape(n, hi - lo, -1) for w in cut(input, lo, hi)]
            if grads is None:  # [N, positions, C_out]; MatMul folds the transpose
                grads = widen(grad_output).reshape(n, c_out, -1).transpose(1, 2)
            # aten.bmm, not @: matmul's decomposition expands (copies) both operands
            parts.append(torch.stack([aten.bmm(w, grads).sum(0) for w in shifted], -1))  # [channels, C_out, offsets]
        return torch.cat(parts, 0).transpose(0, 1).reshape(c_out, c_in, *kernel)
    offsets = math.prod(kernel)
    im2col = torch.cat(list(windows(input)), 1).reshape(n, offsets * c_in, -1)
    grads = grad_output.reshape(n, c_out, -1).transpose(1, 2)
    product = aten.bmm(im2col, grads).sum(0)  # [offsets·C_in, C_out]
    return product.reshape(offsets, c_in, c_out).permute(2, 1, 0).reshape(c_out, c_in, *kernel)


def threshold_backward(grad_output: torch.Tensor, self: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's gradient as a product with a 0/1 mask: onnxruntime's broadcasting Where (torch's
    decomposition) ran 5-10× slower than Mul on these tensors."""
    return grad_output * (self > threshold).to(grad_output.dtype)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """Core ATen, batch norm in reductions (ORT's BatchNormalization ignores training mode), and the
    backward ops that have no ONNX translation (convolution, max and average pooling)."""
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([
        aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional,
        aten._native_batch_norm_legit_no_training, aten.native_batch_norm_backward,
        aten.max_pool2d_with_indices_backward,
    ]))
    table[aten.convolution.default] = folded_conv.convolution
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_backward
    return table


def state_of(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable parameters, everything else the forward reads: buffers and frozen parameters)."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    others = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    others |= {n: b.detach() for n, b in module.named_buffers()}
    return params, others


def initial_state(module: nn.Module, optimizer: OptimizerConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The state file's arrays before the first step: (parameters and buffers, the optimizer's zero moments)."""
    params, others = state_of(module)
    state = {param_key(n): t.numpy() for n, t in params.items()} | {buffer_key(n): t.numpy() for n, t in others.items()}
    moments: dict[str, np.ndarray] = {}
    if optimizer.name == "adamw":
        moments |= {exp_avg_key(n): np.zeros_like(t.numpy()) for n, t in params.items()}
        moments |= {exp_avg_sq_key(n): np.zeros_like(t.numpy()) for n, t in params.items()}
    return state, moments


def make_train_step(module: nn.Module, params: Sequence[str], buffers: Sequence[str],
                    optimizer: OptimizerConfig) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``step(x, side, lr, step, *params, *buffers, *exp_avg, *exp_avg_sq) -> (*outputs, *next state)``.

    AdamW is torch.optim.AdamW's formula (decoupled weight decay, bias-corrected moments); SGD is
    torch.optim.SGD without momentum. A parameter that gets no gradient keeps its value and state,
    as torch's optimizers skip it. Buffers come back as the train-mode forward left them.
    """
    n_params, n_buffers = len(params), len(buffers)
    adamw = optimizer.name == "adamw"
    beta1, beta2 = optimizer.betas

    def step(x: torch.Tensor, side: torch.Tensor, lr: torch.Tensor, count: torch.Tensor,
             *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = [p.detach().requires_grad_() for p in state[:n_params]]
        kept = [b.clone() for b in state[n_params:n_params + n_buffers]]  # the forward updates these in place
        moments = state[n_params + n_buffers:]
        outputs = torch.func.functional_call(module, {**dict(zip(params, weights)), **dict(zip(buffers, kept))},
                                             (x, side))
        grads = torch.autograd.grad(outputs[0], weights, allow_unused=True)
        new_weights, new_m, new_v = [], [], []
        for at, (p, g) in enumerate(zip(weights, grads)):
            p = p.detach()
            if not adamw:
                new_weights.append(p if g is None else p - lr * g)
                continue
            m, v = moments[at], moments[n_params + at]
            if g is not None:
                p = p * (1 - lr * optimizer.weight_decay)
                # torch's formula, associated so that at most two weight-sized temporaries live at once:
                # the gradient dies at its first use, g² (1-β₂) = ((1-β₁) g)² (1-β₂)/(1-β₁)². The traced
                # order is for onnxruntime's depth-first order, which walks an op's later-traced input
                # first: β₁·m before the gradient's scaling, so that it is made after it, not held
                # through the backward; v before m, so that m's update runs first and frees the scaled
                # gradient in v's
                decayed = beta1 * m
                scaled = (1 - beta1) * g
                v = beta2 * v + ((1 - beta2) / (1 - beta1) ** 2) * (scaled * scaled)
                m = decayed + scaled
                correction1 = 1 - beta1 ** count
                correction2 = 1 - beta2 ** count
                p = p - m * ((lr / correction1) / (v.sqrt() / correction2.sqrt() + optimizer.eps))
            new_weights.append(p)
            new_m.append(m)
            new_v.append(v)
        return (*[o.detach() for o in outputs], *new_weights, *kept, *new_m, *new_v)

    return step


def make_eval_step(module: nn.Module, params: Sequence[str], buffers: Sequence[str]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``step(x, side, *params, *buffers) -> outputs`` of the module in eval mode."""
    names = [*params, *buffers]

    def step(x: torch.Tensor, side: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.func.functional_call(module, dict(zip(names, state)), (x, side)))

    return step


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints its stages and warns about deprecations and torchvision; none of it helps here."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace_batch(module: nn.Module, inputs: list[GraphInput]) -> int:
    """A batch size for tracing that equals no other dimension of the block.

    Symbolic tracing gives equal sizes one symbol ("duck sizing"): a batch of 64 beside 64
    channels would tie the batch axis to the channel count and the export would fix it.
    """
    sizes = {int(d) for t in [*module.parameters(), *module.buffers()] for d in t.shape}
    sizes |= {int(d) for spec in inputs for d in spec.shape}
    return next(b for b in range(11, 10_000) if b not in sizes)


def _without_aliases(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop ``aten.alias``/``aten.detach`` (what autograd saves for the backward): each became an ONNX
    Identity, a copy of a whole activation wherever onnxruntime keeps one."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target in (aten.alias.default, aten.detach.default):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def _to_onnx(function: Callable[..., Any], args: Sequence[torch.Tensor], input_names: list[str],
             output_names: list[str], batched: int, where: str) -> onnx.ModelProto:
    """Trace ``function`` into core ATen (batch axis symbolic in the first ``batched`` inputs) and export it."""
    from torch.export import Dim

    try:
        with _quiet_exporter():
            graph = _without_aliases(make_fx(function, decomposition_table=decompositions(),
                                             tracing_mode="symbolic")(*args))
            batch = Dim("batch", min=_MIN_BATCH)
            dynamic = [{0: batch} if at < batched else None for at in range(len(args))]
            # optimize=False: onnxscript 0.7.2's optimizer deletes Add(x, 1e-8) (AdamW's eps), and every
            # update of a parameter without gradient became 0/0 = NaN; onnxruntime folds constants itself
            program = torch.onnx.export(graph, tuple(args), dynamo=True, opset_version=OPSET, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic, optimize=False,
                                        custom_translation_table=folded_conv.TRANSLATIONS | stride_phases.TRANSLATIONS)
    except Exception as exc:  # the tracer and the exporter raise many kinds; all mean "cannot export this"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{where}: the portable training graph cannot be built ({type(exc).__name__}: {first}); "
                          "hint: replace the layer named there, or export without --portable to train with "
                          "onnxruntime-training only") from exc
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        program.save(str(path))
        model = onnx.load(str(path))
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in offline_optimize.STANDARD_DOMAINS})
    if foreign:
        raise ExportError(f"{where}: the portable graph uses non-standard ops {foreign}; hint: replace the layers "
                          "that need them, or export without --portable")
    return model


def _refuse_cumulative_batch_norm(module: nn.Module, where: str) -> None:
    """A batch norm with ``momentum=None`` averages over ``1 / num_batches_tracked``, a Python float read from a
    tensor while tracing: the tracer cannot follow it, so refuse it by name before trying."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.momentum is None and layer.track_running_stats:
            raise ExportError(f"{where}: {name} ({type(layer).__name__}) has momentum=None (a cumulative average of the "
                              "batch statistics), which the portable graph cannot trace; hint: give it a momentum "
                              "(torch's default is 0.1), or export without --portable")


def export_portable(module: nn.Module, inputs: list[GraphInput], outputs: list[tuple[str, str]], block_dir: Path,
                    optimizer: OptimizerConfig, *, where: str) -> PortableSchema:
    """Write the portable train and eval graphs and the initial state (``PORTABLE_FILES``) into ``block_dir``.

    Returns the schema for the manifest; ``where`` names the block and its units in errors.
    """
    if optimizer.name not in ("adamw", "sgd"):
        raise ExportError(f"unknown optimizer {optimizer.name!r}; choose adamw or sgd")
    module = module.train()
    _refuse_cumulative_batch_norm(module, where)
    params, others = state_of(module)
    names_out = [name for name, _ in outputs]
    examples = [example_input(spec, _trace_batch(module, inputs)) for spec in inputs]
    side_names = [spec.name for spec in inputs]
    if len(side_names) != 2:
        raise ExportError(f"{where}: a portable block takes a message and a side input, got {side_names}")
    state, moments = initial_state(module, optimizer)
    keys = [*state, *moments]
    tensors = [torch.from_numpy(np.array(a)) for a in [*state.values(), *moments.values()]]

    train = make_train_step(module, list(params), list(others), optimizer)
    scalars = [torch.tensor(1e-3), torch.tensor(1.0)]
    train_model = _to_onnx(train, [*examples, *scalars, *tensors], [*side_names, "lr", "step", *keys],
                           [*names_out, *[NEXT + k for k in keys]], 2, where)
    in_place = order_updates_after_reads(train_model)
    folded = offline_optimize.fold(train_model)
    if folded is not None and (not in_place or not update_hazards(folded)):
        train_model = folded
    eval_module = module.eval()
    evaluate = make_eval_step(eval_module, list(params), list(others))
    eval_model = _to_onnx(evaluate, [*examples, *tensors[:len(state)]], [*side_names, *state],
                          names_out, 2, where)
    eval_model = offline_optimize.fold(eval_model) or eval_model
    module.train()
    onnx.save(train_model, str(block_dir / TRAIN_FILE))
    onnx.save(eval_model, str(block_dir / EVAL_FILE))
    save_state(block_dir / STATE_FILE, {**state, **moments})
    schema = PortableSchema(parameters=list(params), buffers=list(others),
                            optimizer_state=(["exp_avg", "exp_avg_sq"] if moments else []), opset=OPSET,
                            num_state_bytes=int(sum(a.nbytes for a in [*state.values(), *moments.values()])),
                            in_place=in_place)
    return schema
