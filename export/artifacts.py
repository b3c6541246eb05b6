"""One torch block -> ONNX (training mode) -> ORT training artifacts, with the fixes ORT 1.19.2 needs."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgebll.errors import ExportError
from edgebll.manifest import BatchNormStat, TensorSpec

# ORT 1.19.2 loads ONNX IR <= 10; opset 17 keeps every op we use trainable (GELU-tanh is wrong at 20).
OPSET = 17


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer baked into a block's optimizer graph (the learning rate is set per step)."""

    name: str = "adamw"
    """"adamw" (torch's formula) or "sgd" (plain SGD, as torch.optim.SGD without momentum)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        if self.name == "sgd":
            return {"type": "sgd"}
        return {"type": "adamw", "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "formula": "torch"}


@dataclass
class BlockGraph:
    """What the export learned about a block's graph (for its manifest)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    bn_stats: list[BatchNormStat]


@dataclass(frozen=True)
class GraphInput:
    """One input of a block's training graph (per-sample shape; the batch axis is added)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """"float32" or "int64"."""
    role: str


def example_input(spec: GraphInput, batch_size: int) -> torch.Tensor:
    """An example tensor of ``spec`` at ``batch_size`` for tracing (zeros for integer inputs)."""
    if spec.dtype == "int64":
        return torch.zeros(batch_size, *spec.shape, dtype=torch.int64)
    return torch.randn(batch_size, *spec.shape)


def _bn_spatial_sizes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """H*W seen by every BatchNorm (keyed by its running_mean buffer name), from one eval forward."""
    sizes: dict[str, int] = {}
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            def hook(_m: nn.Module, args: tuple, _out: Any, key: str = f"{name}.running_mean") -> None:
                sizes[key] = int(args[0][0, 0].numel())
            handles.append(sub.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(*inputs)
    module.train(was_training)
    for h in handles:
        h.remove()
    return sizes


def export_training_onnx(module: nn.Module, inputs: list[GraphInput], outputs: list[tuple[str, str]],
                         batch_size: int) -> tuple[onnx.ModelProto, BlockGraph]:
    """Export ``module(*inputs) -> outputs`` in training mode; append BatchNorm running statistics as outputs.

    ``outputs`` are (name, role) pairs in the module's return order; the first must be the loss.
    """
    examples = tuple(example_input(spec, batch_size) for spec in inputs)
    spatial = _bn_spatial_sizes(module, examples)
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    # The exporter runs one train-mode forward, which moves BatchNorm statistics: export a copy.
    copy_ = copy.deepcopy(module).train()
    with torch.no_grad():
        values = copy_(*examples)
    if len(values) != len(outputs) or outputs[0][1] != "loss":
        raise ExportError(f"{type(module).__name__} returns {len(values)} outputs, expected {[n for n, _ in outputs]} "
                          "with the loss first")
    names = [n for n, _ in outputs]
    dynamic = {spec.name: {0: "batch"} for spec in inputs}
    dynamic |= {name: {0: "batch"} for name, value in zip(names, values) if value.dim() > 0}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the TorchScript exporter is deprecated but is the one that exports training graphs ORT can differentiate
        warnings.simplefilter("ignore")
        path = Path(tmp) / "block.onnx"
        torch.onnx.export(
            copy_, examples, str(path), input_names=[spec.name for spec in inputs], output_names=names,
            dynamic_axes=dynamic, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False,
            opset_version=OPSET,
        )
        model = onnx.load(str(path))
    name_optional_outputs(model)
    for init in model.graph.initializer:  # restore the statistics the export forward moved
        if init.name in buffers:
            init.CopyFrom(numpy_helper.from_array(buffers[init.name].numpy(), init.name))

    initializers = {i.name: i for i in model.graph.initializer}
    bn_stats: list[BatchNormStat] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) < 3:
            continue
        momentum = next((a.f for a in node.attribute if a.name == "momentum"), 0.9)
        for k, kind in ((1, "mean"), (2, "var")):
            param = node.input[2 + k]
            if param not in initializers:
                raise ExportError(f"BatchNorm node {node.name}: running statistic {param!r} is not an initializer")
            dims = list(initializers[param].dims)
            model.graph.output.append(helper.make_tensor_value_info(node.output[k], onnx.TensorProto.FLOAT, dims))
            key = param if kind == "mean" else param.replace("running_var", "running_mean")
            bn_stats.append(BatchNormStat(output=node.output[k], parameter=param, kind=kind, momentum=momentum,
                                          spatial=spatial.get(key, 1)))

    graph = BlockGraph(
        inputs=[TensorSpec(name=spec.name, shape=["batch", *spec.shape], dtype=spec.dtype, role=spec.role)
                for spec in inputs],
        outputs=[TensorSpec(name=name, shape=(["batch", *value.shape[1:]] if value.dim() > 0 else []),
                            dtype="float32", role=role) for (name, role), value in zip(outputs, values)]
        + [TensorSpec(name=s.output, shape=list(initializers[s.parameter].dims), dtype="float32", role="bn_stat")
           for s in bn_stats],
        bn_stats=bn_stats,
    )
    return model, graph


# op -> how many outputs ORT's gradient builder reads (torch exports only the first)
_GRADIENT_READS_OUTPUTS = {"LayerNormalization": 3, "SoftmaxCrossEntropyLoss": 2}


def name_optional_outputs(model: onnx.ModelProto) -> int:
    """Name the optional outputs that ORT's gradient builders read but torch's exporter leaves out.

    LayerNormalization's gradient needs its Mean and InvStdDev outputs (and SoftmaxCrossEntropyLoss
    its log-prob); without names generate_artifacts cannot build the backward graph. Returns how
    many nodes were patched.
    """
    patched = 0
    for at, node in enumerate(model.graph.node):
        wanted = _GRADIENT_READS_OUTPUTS.get(node.op_type, 0)
        if len(node.output) < wanted:
            base = node.name or f"{node.op_type}_{at}"
            node.output.extend(f"{base}_optional_output{k}" for k in range(len(node.output), wanted))
            patched += 1
    return patched


def fix_eval_batchnorm(path: Path) -> int:
    """Make the generated eval graph loadable: eval-mode BatchNorm must have exactly one output.

    generate_artifacts keeps the three training outputs on the eval copy, which ONNX shape
    inference rejects. A dropped output that is also a graph output is fed from the BatchNorm's
    running-statistic input through an Identity, so the eval graph's outputs stay the same.
    """
    model = onnx.load(str(path))
    graph_outputs = {o.name for o in model.graph.output}
    nodes, fixed = [], 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "BatchNormalization" or len(node.output) <= 1:
            continue
        if any(a.name == "training_mode" and a.i != 0 for a in node.attribute):
            continue
        extra = list(node.output[1:])
        del node.output[1:]
        for attr in [a for a in node.attribute if a.name == "training_mode"]:
            node.attribute.remove(attr)
        for k, name in enumerate(extra):
            if name in graph_outputs:
                nodes.append(helper.make_node("Identity", [node.input[3 + k]], [name], name=f"{node.name}_stat{k}"))
        fixed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return fixed


def use_torch_adamw(path: Path, config: OptimizerConfig) -> None:
    """Switch ORT's AdamW node to torch's formula (adam_mode=0) and set eps and weight decay.

    ORT's default is the Hugging Face variant (eps added to the uncorrected sqrt(v)), which drifts
    from torch.optim.AdamW by ~1e-3 after one step; onnxblock hard-codes it, so patch the node.
    """
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise ExportError(f"{path}: expected one AdamWOptimizer node, found {len(nodes)}")
    values = {"adam_mode": 0, "alpha": config.betas[0], "beta": config.betas[1], "epsilon": config.eps,
              "weight_decay": config.weight_decay, "correct_bias": 1}
    kept = [a for a in nodes[0].attribute if a.name not in values]
    del nodes[0].attribute[:]
    nodes[0].attribute.extend(kept + [helper.make_attribute(k, v) for k, v in values.items()])
    onnx.save(model, str(path))


@contextlib.contextmanager
def _native_stderr_to_log(log: Path) -> Iterator[None]:
    """Send file descriptor 2 to ``log`` while ORT builds the gradient graph.

    Its graph optimiser logs every pass at INFO level from C++, ignoring the Python-side logger
    severity; the log stays next to the artifacts for when something goes wrong.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate_block_artifacts(model: onnx.ModelProto, graph: BlockGraph, trainable: list[str], out_dir: Path,
                             optimizer: OptimizerConfig) -> None:
    """Write training, eval and optimizer graphs and the checkpoint into ``out_dir`` (which exists)."""
    # imported here, not at the top: the model zoo and the portable export import without the training
    # build (a GPU machine with onnxruntime-gpu builds the torch blocks from this package)
    from onnxruntime.training import artifacts as ort_artifacts

    onnxruntime.set_default_logger_severity(3)
    if optimizer.name not in ("adamw", "sgd"):
        raise ExportError(f"unknown optimizer {optimizer.name!r}; choose adamw or sgd")
    with _native_stderr_to_log(out_dir / "export.log"):
        ort_artifacts.generate_artifacts(
            model,
            requires_grad=trainable,
            frozen_params=[s.parameter for s in graph.bn_stats],
            loss=None,  # the graph's first output is the loss; the others come back from every step
            optimizer=ort_artifacts.OptimType.AdamW if optimizer.name == "adamw" else ort_artifacts.OptimType.SGD,
            artifact_directory=str(out_dir),
        )
    fix_eval_batchnorm(out_dir / "eval_model.onnx")
    if optimizer.name == "adamw":
        use_torch_adamw(out_dir / "optimizer_model.onnx", optimizer)
