"""Import ONNX Runtime's on-device training API without torch.

``onnxruntime/training/__init__.py`` imports ``artifacts`` (which imports torch) and probes for
ORTModule, so a plain ``import onnxruntime.training.api`` fails on a board without torch. The
classes we need (``CheckpointState``, ``Module``, ``Optimizer``) only wrap the C++ objects in
``onnxruntime.capi._pybind_state``. When the real package has not been imported yet, we register
an empty ``onnxruntime.training`` package whose ``__path__`` points at the installed folder, so
that only the ``api`` submodules load.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

from edgebll.errors import EdgeBLLError

_HINT = (
    "hint: on x86-64 `pip install onnxruntime-training-cpu==1.19.2`; on a board (aarch64) build "
    "ONNX Runtime from source with --enable_training_apis (see devices/README.md)"
)


def training_available() -> bool:
    """Whether the installed onnxruntime has the training API (onnxruntime-training), without importing it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return os.path.isdir(os.path.join(spec.submodule_search_locations[0], "training", "api"))


def training_api() -> Any:
    """Return the ``onnxruntime.training.api`` module, importing it without torch if possible."""
    if "onnxruntime.training.api" in sys.modules:
        _quiet()
        return sys.modules["onnxruntime.training.api"]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeBLLError(f"onnxruntime is not installed; {_HINT}")
    training_dir = os.path.join(spec.submodule_search_locations[0], "training")
    if not os.path.isdir(os.path.join(training_dir, "api")):
        raise EdgeBLLError(
            "the installed onnxruntime has no training API (plain `onnxruntime` is inference "
            f"only); {_HINT}"
        )
    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [training_dir]
        sys.modules["onnxruntime.training"] = package
        # onnxruntime/__init__.py probes ORTModule; None makes that import fail, which it tolerates.
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
    api = importlib.import_module("onnxruntime.training.api")
    _quiet()
    return api


def _quiet() -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT logs every graph pass of a training session
