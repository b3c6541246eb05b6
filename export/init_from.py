"""``export --init-from``: start a run's blocks from pretrained weights instead of a fresh initialisation.

Two sources:

- a trained (or exported) edgebll run of the same model: every unit gets its weights by unit name,
  whatever the two runs' splits, and a block whose units, kind and index equal a block of the
  source also gets that block's head (and a BLL feedback block its weights), so the same split
  starts exactly where the source ended;
- a torch ``state_dict`` file of ``nn.Sequential(*units)`` (keys ``"<unit index>.<name>"``):
  ``torch.save(nn.Sequential(*units).state_dict(), "units.pt")``;
- an ONNX model of ``nn.Sequential(*units)`` whose initializers keep the state_dict's names and
  BatchNorm unfolded: ``torch.onnx.export(nn.Sequential(*units).eval(), (x,), "units.onnx",
  optimize=False)`` (the dynamo exporter). Both exporters' defaults fold BatchNorm into the
  convolutions (measured, torch 2.13), which loses the units' own weights and statistics; such a
  model is refused with that hint. (The TorchScript exporter keeps BatchNorm only in training mode,
  and its trace then moves the running statistics it exports.)

Parameters and buffers (BatchNorm statistics) are copied; a missing or surplus key, or a shape
that differs, is refused naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgebll.errors import EdgeBLLError, ExportError

from .models import ModelSpec

if TYPE_CHECKING:
    from .exporter import BlockPlan


def initialise(source: str | os.PathLike, spec: ModelSpec, plans: list["BlockPlan"]) -> dict[str, Any]:
    """Copy ``source``'s weights into ``spec``'s units and ``plans``' modules; returns run.json's ``init_from``."""
    path = Path(source)
    if path.is_dir() and (path / "run.json").is_file():
        return _from_run(path, spec, plans)
    if path.is_file() and path.suffix == ".onnx":
        return _from_onnx(path, spec)
    if path.is_file():
        return _from_state_dict(path, spec)
    raise ExportError(f"--init-from {path}: neither an edgebll run folder (with run.json) nor a state_dict file")


def _from_state_dict(path: Path, spec: ModelSpec) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a file it cannot read
        raise ExportError(f"--init-from {path}: not a torch state_dict file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"--init-from {path}: holds a {type(state).__name__}, not a state_dict; save "
                          "nn.Sequential(*units).state_dict()")
    units = nn.Sequential(*spec.units)
    _load(units, state, f"--init-from {path}", "nn.Sequential(*units)")
    return {"source": str(path.resolve()), "kind": "state_dict", "units": len(spec.units), "heads": 0}


_ONNX_HINT = ("hint: export nn.Sequential(*units) with BatchNorm unfolded and the state_dict's names: "
              "torch.onnx.export(units.eval(), (x,), 'units.onnx', optimize=False), or pass "
              "units.state_dict() saved with torch.save")


def _from_onnx(path: Path, spec: ModelSpec) -> dict[str, Any]:
    """Weights from an ONNX model's initializers, matched to ``nn.Sequential(*units)``'s state_dict by name.

    An initializer named like a key, or ending in ``.<key>`` (a model exported with a wrapper around the
    units), gives that key; initializers that match no key (the exporter's constants) are ignored.
    """
    where = f"--init-from {path}"
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, a missing external data file, ...
        raise ExportError(f"{where}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    tensors = {init.name: init for init in model.graph.initializer}
    units = nn.Sequential(*spec.units)
    wanted = [k for k in units.state_dict() if not k.endswith("num_batches_tracked")]
    state: dict[str, torch.Tensor] = {}
    for key in wanted:
        names = [n for n in tensors if n == key or n.endswith("." + key)]
        if len(names) > 1 and key in names:
            names = [key]
        if len(names) > 1:
            raise ExportError(f"{where}: initializers {names[:3]} all end in {key!r}; hint: export the units alone")
        if names:
            state[key] = torch.from_numpy(numpy_helper.to_array(tensors[names[0]]).copy())
    missing = [k for k in wanted if k not in state]
    if missing == wanted:
        raise ExportError(f"{where}: none of its {len(tensors)} initializers is named like a weight of "
                          f"nn.Sequential(*units) (e.g. {wanted[0]!r}); {_ONNX_HINT}")
    norms = {f"{name}.{p}" for name, m in units.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in ("weight", "bias", "running_mean", "running_var")}
    if missing and set(missing) <= norms:
        raise ExportError(f"{where}: its BatchNorm layers are folded into the convolutions ({missing[0]!r} and "
                          f"{len(missing) - 1} more are missing); {_ONNX_HINT}")
    _load(units, state, where, "nn.Sequential(*units)")
    return {"source": str(path.resolve()), "kind": "onnx", "units": len(spec.units), "heads": 0}


def _from_run(run: Path, spec: ModelSpec, plans: list["BlockPlan"]) -> dict[str, Any]:
    from edgebll.backends import open_block
    from edgebll.run_folder import FEEDBACK_DIR, load_run_config

    config = load_run_config(run)
    where = f"--init-from {run}"
    if config.model != spec.name or list(config.input_shape) != list(spec.input_shape) \
            or (config.num_classes or -1) != spec.num_classes:
        raise ExportError(f"{where}: a {config.model} run on {config.input_shape} samples with "
                          f"{config.num_classes} classes; this export is {spec.name} on {list(spec.input_shape)} "
                          f"with {spec.num_classes}; hint: initialise from a run of the same model and data shape")
    source_units: list[list[str]] = config.units
    index = {name: at for at, name in enumerate(spec.unit_names)}
    unit_states: dict[int, dict[str, torch.Tensor]] = {at: {} for at in range(len(spec.units))}
    blocks: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for k, names in enumerate(source_units):
        for kind, folder in (("forward", run / f"block-{k}"), ("feedback", run / f"block-{k}" / FEEDBACK_DIR)):
            if not (folder / "manifest.json").is_file():
                continue
            try:
                params = open_block(folder).parameters()
            except EdgeBLLError as exc:
                raise ExportError(f"{where}: cannot read {folder}: {exc}") from exc
            blocks[(kind, k)] = params
            if kind != "forward":
                continue
            for key, value in params.items():
                parts = key.split(".", 2)
                if parts[0] != "body" or len(parts) < 3:
                    continue
                unit = names[int(parts[1])]
                if unit not in index:
                    raise ExportError(f"{where}: its unit {unit!r} is not a unit of this model ({spec.unit_names})")
                unit_states[index[unit]][parts[2]] = torch.from_numpy(np.array(value))
    for at, unit in enumerate(spec.units):
        _load(unit, unit_states[at], where, f"unit {spec.unit_names[at]!r}")
    heads = 0
    for plan in plans:
        key = (plan.kind, plan.index)
        if key in blocks and plan.index < len(source_units) and plan.units == source_units[plan.index]:
            state = {name: torch.from_numpy(np.array(v)) for name, v in blocks[key].items()}
            _load(plan.module, state, where, f"block {plan.index} ({plan.kind})")
            heads += 1
    return {"source": str(run.resolve()), "kind": "run", "units": len(spec.units), "heads": heads}


def _load(module: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """``module.load_state_dict(state)``, every key accounted for; refusals name the key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    surplus = [k for k in state if k not in own]
    if missing or surplus:
        raise ExportError(f"{where}: {what} does not match: missing {missing[:4]}, unexpected {surplus[:4]}; hint: the "
                          "source must hold the same layers")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ExportError(f"{where}: {what}: {k} has shape {list(state[k].shape)}, this model's {list(own[k].shape)}")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in state}, strict=False)
