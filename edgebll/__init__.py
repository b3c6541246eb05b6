"""edgebll: block-local training on edge devices.

The device runtime (this package) imports only numpy, onnxruntime (plain, or the training build
where it is installed) and the standard library; the host-side exporter lives in ``edgebll.export`` and needs torch and onnx.

    from edgebll.export import export_model      # host
    from edgebll import Runtime                   # device
    export_model("cnn-small", method="bwbpf", blocks=4, out="runs/a")
    Runtime.from_run("runs/a").train(epochs=1, codec="int8")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Runtime": "edgebll.runtime", "TrainConfig": "edgebll.train_config", "BlockRunner": "edgebll.runner",
    "EdgeBLLError": "edgebll.errors", "ArrayDataset": "edgebll.dataset_folder",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `edgebll --help` and the codec must not pay for loading ONNX Runtime.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgebll' has no attribute {name!r}")
