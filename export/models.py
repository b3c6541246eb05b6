"""Model zoo: each model is a list of *units*, the finest points where it may be split into blocks.

A unit is an ``nn.Module`` mapping one activation tensor to the next. The partitioner groups
consecutive units into blocks; a block never splits a unit (a residual block, a conv stage).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgebll.errors import ExportError
from edgebll.sequence_data import ReversalTask

from .transformer import TransformerConfig, transformer_units


@dataclass(kw_only=True)
class ModelSpec:
    """A model ready to partition."""

    name: str
    """Zoo name, or "custom" for a user-given list of units."""
    units: list[nn.Module]
    """Consecutive modules, activation in -> activation out."""
    input_shape: tuple[int, ...] = (1, 28, 28)
    """Shape of one sample (C, H, W), or (T,) token ids."""
    input_dtype: str = "float32"
    """dtype of the first unit's input: "float32" (images) or "int64" (token ids)."""
    num_classes: int = 10
    label_shape: tuple[int, ...] = ()
    """Shape of one sample's labels: () one class per sample, (T,) one per token (logits [T, classes])."""
    data: dict[str, Any] = field(default_factory=lambda: {"dataset": "fashion-mnist"})
    """run.json's ``data`` entry: the dataset the runtime trains and evaluates on."""
    unit_names: list[str] = field(default_factory=list)
    """Readable name per unit (for messages and the manifest)."""

    def __post_init__(self) -> None:
        if not self.units:
            raise ExportError(f"model {self.name!r} has no units to split")
        if not self.unit_names:
            self.unit_names = [f"unit{i}" for i in range(len(self.units))]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def cnn_small(in_channels: int = 1, num_classes: int = 10, width: int = 32,
              image_size: tuple[int, int] = (28, 28)) -> ModelSpec:
    """Four conv stages of two conv-BN-ReLU each (~1.2 M parameters at width 32).

    Stage s has ``width * 2**s`` channels; stages 1-3 halve the resolution (28 -> 14 -> 7 -> 4).
    """
    units, cin = [], in_channels
    for stage in range(4):
        cout = width * 2**stage
        layers = conv_bn_relu(cin, cout, stride=1 if stage == 0 else 2) + conv_bn_relu(cout, cout)
        units.append(nn.Sequential(*layers))
        cin = cout
    return ModelSpec(
        name="cnn-small",
        units=units,
        input_shape=(in_channels, *image_size),
        num_classes=num_classes,
        unit_names=[f"stage{s}" for s in range(4)],
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a residual connection (1x1 conv when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(in_channels: int = 1, num_classes: int = 10, width: int = 64,
             image_size: tuple[int, int] = (28, 28)) -> ModelSpec:
    """ResNet-18 as used on CIFAR, for 28x28 inputs: 3x3 stem, no max-pool, 4 stages of 2 blocks."""
    units: list[nn.Module] = [nn.Sequential(*conv_bn_relu(in_channels, width))]
    names = ["stem"]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        for b in range(2):
            units.append(BasicBlock(cin, cout, stride=2 if (stage > 0 and b == 0) else 1))
            names.append(f"layer{stage + 1}.{b}")
            cin = cout
    return ModelSpec(
        name="resnet18", units=units, input_shape=(in_channels, *image_size), num_classes=num_classes,
        unit_names=names
    )


def transformer(config: TransformerConfig | None = None, task: ReversalTask | None = None) -> ModelSpec:
    """The BLL paper's sequence model and task: a token + position embedding, then ``config.layers``
    one-head transformer layers (20 by default), reversing a permutation of 0..9 token by token."""
    config = config or TransformerConfig()
    task = task or ReversalTask(length=config.length)
    if task.length != config.length:
        raise ExportError(f"transformer: the model reads sequences of {config.length} tokens but the task has "
                          f"{task.length}; hint: give both the same length")
    units = transformer_units(config)
    return ModelSpec(
        name="transformer", units=units, input_shape=(config.length,), input_dtype="int64",
        num_classes=config.length, label_shape=(config.length,), data=task.to_dict(),
        unit_names=["embedding"] + [f"layer{i}" for i in range(config.layers)],
    )


def vgg8b(in_channels: int = 1, num_classes: int = 10, width: int = 128,
          image_size: tuple[int, int] = (28, 28)) -> ModelSpec:
    """VGG8b of Nøkland & Eidnes (2019): conv128-conv256-pool-conv256-conv512-pool-conv512-pool-conv512-pool-fc1024-fc.

    Every conv is 3x3 + BatchNorm + ReLU; pools are 2x2 max (28 -> 14 -> 7 -> 3 -> 1). One unit per
    layer (a pool belongs to the conv before it, so the message after it is 4x smaller), so
    ``--blocks 7`` trains every layer on its own; the last block's head is the final fc.
    ``width`` scales every layer (128: the paper's 7.3 M parameters with the classifier).
    """
    plan = [(width, False), (2 * width, True), (2 * width, False), (4 * width, True), (4 * width, True), (4 * width, True)]
    units: list[nn.Module] = []
    if min(image_size) < 16:  # four 2x2 max-pools: a smaller image has no pixel left before the classifier
        raise ExportError(f"vgg8b pools an image down 16x and needs at least 16x16 pixels, got "
                          f"{image_size[0]}x{image_size[1]}; hint: use cnn-small or resnet18, which take any size")
    cin, (height, width_px) = in_channels, image_size
    for cout, pool in plan:
        layers = conv_bn_relu(cin, cout) + ([nn.MaxPool2d(2)] if pool else [])
        units.append(nn.Sequential(*layers))
        cin, height, width_px = cout, height // 2 if pool else height, width_px // 2 if pool else width_px
    hidden = 8 * width
    units.append(nn.Sequential(nn.Flatten(), nn.Linear(cin * height * width_px, hidden, bias=False),
                               nn.BatchNorm1d(hidden), nn.ReLU()))
    return ModelSpec(
        name="vgg8b" if width == 128 else f"vgg8b-w{width}", units=units, input_shape=(in_channels, *image_size),
        num_classes=num_classes, unit_names=[f"conv{i + 1}" for i in range(len(plan))] + ["fc1"],
    )


IMAGE_MODELS: dict[str, Callable[..., ModelSpec]] = {"cnn-small": cnn_small, "resnet18": resnet18, "vgg8b": vgg8b}
SEQUENCE_MODELS: dict[str, Callable[[], ModelSpec]] = {"transformer": transformer}
"""Models of a fixed task: they bring their own input shape, classes and data."""
MODELS = {**IMAGE_MODELS, **SEQUENCE_MODELS}


def build_model(model: str | ModelSpec | Sequence[nn.Module] | nn.Sequential, *,
                input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                data: str | os.PathLike | None = None) -> ModelSpec:
    """A zoo model by name, or a user's own list of units (an ``nn.Sequential`` counts as one).

    ``data``: a dataset folder (``edgebll data import``); its sample shape, dtype, label shape and
    classes replace ``input_shape`` and ``num_classes``, and the run trains and evaluates on it.
    """
    if data is not None:
        return _on_data(model, Path(data))
    if isinstance(model, ModelSpec):  # a zoo model built with non-default options, e.g. vgg8b(width=32)
        return model
    if isinstance(model, str):
        if model in SEQUENCE_MODELS:
            return SEQUENCE_MODELS[model]()
        if model not in IMAGE_MODELS:
            raise ExportError(f"unknown model {model!r}; choose one of {sorted(MODELS)} or pass a list of nn.Modules")
        if len(input_shape) != 3:
            raise ExportError(f"{model} takes images [C, H, W], got samples of shape {list(input_shape)}; hint: pass "
                              "your own list of units for other data (export_model(units, input_shape=...))")
        return IMAGE_MODELS[model](in_channels=input_shape[0], num_classes=num_classes,
                                   image_size=tuple(input_shape[1:]))
    if isinstance(model, nn.Module) and not isinstance(model, (nn.Sequential, nn.ModuleList)):
        children = [name for name, _ in model.named_children()]
        raise ExportError(f"custom model: a {type(model).__name__} is one module with its own forward(), not a list of "
                          f"units the partitioner can split; hint: pass the units in order, e.g. "
                          f"[model.{children[0] if children else 'stem'}, ...] (list(model.children()) when forward() "
                          "only chains its children), with any reshaping (torch.flatten) as an nn.Flatten unit")
    units = list(model.children()) if isinstance(model, nn.Sequential) else list(model)
    bad = [i for i, u in enumerate(units) if not isinstance(u, nn.Module)]
    if bad:
        raise ExportError(f"custom model: item {bad[0]} is a {type(units[bad[0]]).__name__}, not an nn.Module")
    return ModelSpec(name="custom", units=units, input_shape=tuple(input_shape), num_classes=num_classes)


def _on_data(model: str | ModelSpec | Sequence[nn.Module] | nn.Sequential, folder: Path) -> ModelSpec:
    """``model`` shaped for the dataset folder ``folder``, with run.json's ``data`` naming it."""
    from edgebll.dataset_folder import read_dataset_info
    from edgebll.errors import DataError

    try:
        info = read_dataset_info(folder)
    except DataError as exc:
        raise ExportError(str(exc)) from exc
    if isinstance(model, ModelSpec) or (isinstance(model, str) and model in SEQUENCE_MODELS):
        name = model.name if isinstance(model, ModelSpec) else model
        raise ExportError(f"{name} brings its own task and data; --data needs a zoo image model (cnn-small, "
                          "resnet18, vgg8b) or your own list of units")
    if isinstance(model, str) and (info.dtype == "int64" or info.label_shape):
        raise ExportError(f"{folder}: token ids / per-token labels need a sequence model; {model} classifies "
                          "images; hint: pass your own list of units (an nn.Embedding first)")
    spec = build_model(model, input_shape=info.sample_shape, num_classes=info.num_classes)
    spec.input_dtype = info.input_dtype
    spec.label_shape = info.label_shape
    spec.data = info.run_data(folder)
    return spec
