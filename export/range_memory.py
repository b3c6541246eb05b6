"""The estimated peak memory of a range of units trained as one block, for the boundary search.

Nothing is modelled: units ``lo .. hi-1`` are planned as the middle block of the split
``[0, lo) [lo, hi) [hi, n)`` — so the block has the head, the message input and output and (BLL)
the feedback block it will have in the final export — exported to a scratch folder, and read by
:func:`edgebll.memory.estimate_peak_bytes` from its training graph, exactly as the exporter writes
the estimate into a manifest. The search therefore sees the numbers the export will check (a test
compares them; a board that trains on the portable graphs: see ``export_to_fit``). An additive per-unit model would be cheaper but not the same number: a block's
activation peak is not the sum of its units'. Each range is exported at most once, only when the
search asks for it, and traced at a tiny batch (:data:`TRACE_BATCH`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifacts import OptimizerConfig
from .exporter import export_block, plan_blocks
from .models import ModelSpec
from .predsim import PredSimConfig


TRACE_BATCH = 2
"""Batch torch traces a range with: the exported graph has a symbolic batch axis, so the estimate
(made at ``batch_size``) is the same as from a full-batch trace, and the trace's convolutions cost
1/32 of batch 64's (they were most of a range's export time)."""


@dataclass(kw_only=True)
class RangeMemory:
    """``memory(lo, hi)``: estimated peak bytes of training units lo..hi-1 as one block (BLL: with its feedback block)."""

    spec: ModelSpec
    method: str = "bwbpf"
    batch_size: int = 64
    head: str = "conv"
    latent: str = "categorical"
    predsim: PredSimConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    estimates: dict[tuple[int, int], int] = field(default_factory=dict)
    """Every range estimated so far."""
    seconds: float = 0.0
    """Time spent exporting ranges."""
    on_estimate: Callable[[int, int], None] | None = None
    """Called after each range is exported and estimated (a progress bar)."""

    def __call__(self, lo: int, hi: int) -> int:
        if (lo, hi) not in self.estimates:
            began = time.perf_counter()
            self.estimates[lo, hi] = self._export_and_estimate(lo, hi)
            self.seconds += time.perf_counter() - began
            if self.on_estimate is not None:
                self.on_estimate(lo, hi)
        return self.estimates[lo, hi]

    def _export_and_estimate(self, lo: int, hi: int) -> int:
        n = len(self.spec.units)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"unit range [{lo}, {hi}) is not inside the model's {n} units")
        bounds = sorted({0, lo, hi, n})
        index = bounds.index(lo)
        scratch = Path(tempfile.mkdtemp(prefix="edgebll-range-"))
        try:
            with torch.random.fork_rng(devices=[]):  # new heads draw weights: leave the caller's generator as it was
                plans = [p for p in plan_blocks(self.spec, self.method, len(bounds) - 1, self.head, self.latent,
                                                self.predsim, bounds=bounds) if p.index == index]
                return sum(export_block(plan, scratch / plan.kind, num_blocks=len(bounds) - 1, method=self.method,
                                        model_name=self.spec.name, batch_size=self.batch_size,
                                        optimizer=self.optimizer, trace_batch_size=TRACE_BATCH).estimated_peak_bytes
                           for plan in plans)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
