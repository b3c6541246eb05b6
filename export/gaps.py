"""Layers a route of the exporter cannot train, found where the route fails and named for the user.

onnxruntime-training's gradient builder has no gradient for some ONNX ops (HardSwish, HardSigmoid,
InstanceNormalization, which torch's GroupNorm and InstanceNorm become); its error names the op and
the graph node, and the node's scope names the torch module. torch.onnx cannot export some layers
in training mode at all (Dropout1d/2d/3d: ``aten::feature_dropout``). These helpers turn such
failures into a sentence naming the layer, its unit and what to do.
"""

from __future__ import annotations

import re

from torch import nn

_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\w+) for node (\S+)")
_NO_EXPORT = re.compile(r"ONNX export of operator (aten::\w+), training mode")
_ALTERNATIVES = {
    "HardSwish": "nn.ReLU or nn.SiLU", "HardSigmoid": "nn.Sigmoid",
    "InstanceNormalization": "nn.BatchNorm2d (GroupNorm and InstanceNorm become this op)",
    "aten::feature_dropout": "nn.Dropout (element-wise), or no dropout",
    "aten::feature_alpha_dropout": "nn.Dropout, or no dropout",
}


def layer_at(module: nn.Module, node: str) -> str:
    """The torch layer an exported node comes from (``/body/body.0/body.0.1/X`` -> ``body.0.1 (GroupNorm)``)."""
    scopes = [part for part in node.strip("/").split("/")[:-1] if part]
    for name in reversed(scopes):
        try:
            return f"{name} ({type(module.get_submodule(name)).__name__})"
        except AttributeError:
            continue
    return node


def missing_gradient(message: str, module: nn.Module) -> tuple[str, str] | None:
    """(op, layer) where onnxruntime-training refused a graph for want of a gradient; None for other errors."""
    found = _NO_GRADIENT.search(message)
    return (found.group(1), layer_at(module, found.group(2))) if found else None


def unexportable(message: str, module: nn.Module) -> str | None:
    """A sentence naming the layer that torch.onnx cannot export in training mode; None for other errors."""
    found = _NO_EXPORT.search(message)
    if found is None:
        return None
    op = found.group(1)
    kinds = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d) if op == "aten::feature_dropout" else \
        (nn.FeatureAlphaDropout,) if op == "aten::feature_alpha_dropout" else ()
    layers = [f"{name} ({type(m).__name__})" for name, m in module.named_modules() if isinstance(m, kinds)]
    return f"{', '.join(layers) or op} cannot be exported in training mode ({op}); hint: use {alternative(op)}"


def alternative(op: str) -> str:
    return _ALTERNATIVES.get(op, "another layer")
