"""Host-side exporter (needs torch and onnx): installed as ``edgebll.export``.

``export_model(...)`` turns a model into one ONNX Runtime training artifact folder per block.
"""

from .artifacts import OptimizerConfig
from .exporter import BlockPlan, build_blocks, export_block, export_model, plan_blocks
from .models import MODELS, ModelSpec, build_model
from .predsim import PredSimConfig

__all__ = ["MODELS", "BlockPlan", "ModelSpec", "OptimizerConfig", "PredSimConfig", "build_blocks", "build_model", "export_block",
           "export_model", "plan_blocks"]
