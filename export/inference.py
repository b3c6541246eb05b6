"""One deployable inference model from a trained run: the forward chain of every block, merged.

Each block exports its own inference graph on the device (``Runtime.export_for_inference``:
ORT's ``export_model_for_inferencing`` of x -> logits, y). Here, on the host, ``onnx.compose``
joins them (block k's ``y`` feeds block k+1's ``x``) and ``onnx.utils.Extractor`` keeps only what
the outputs need, so the early blocks' local heads disappear unless asked for. BLL's feedback
blocks are not part of it: they are not needed at test time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgebll.errors import ExportError


def _rename(graph: object, old: str, new: str) -> None:
    """Rename a value everywhere in ``graph`` (inputs, outputs and node edges)."""
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def chain_inference_model(run_dir: str | os.PathLike, out: str | os.PathLike, *, all_heads: bool = False,
                          threads: int = 0) -> Path:
    """Write ``out``: input ``x`` -> output ``logits`` (the last block's), the whole trained forward chain.

    With ``all_heads`` the model also outputs ``logits_k`` of every block's local head (k < K-1).
    The weights are the trained ones (``trained/checkpoint``), or the exported ones before training.
    """
    import onnx
    from onnx import compose, utils

    from edgebll.runtime import Runtime

    runtime = Runtime.from_run(run_dir, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        models = [compose.add_prefix(onnx.load(path), f"block{k}_")
                  for k, path in enumerate(runtime.export_for_inference(tmp))]
    merged = models[0]
    for k in range(1, len(models)):
        merged = compose.merge_models(merged, models[k], io_map=[(f"block{k - 1}_y", f"block{k}_x")])
    last = len(models) - 1
    wanted = [f"block{last}_logits"] + ([f"block{k}_logits" for k in range(last)] if all_heads else [])
    missing = [name for name in wanted if name not in {o.name for o in merged.graph.output}]
    if missing:
        raise ExportError(f"{run_dir}: the merged chain has no outputs {missing}; hint: re-export the run")
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "chain.onnx"
        onnx.save(merged, whole)
        pruned = utils.Extractor(onnx.load(whole)).extract_model(["block0_x"], wanted)
    _rename(pruned.graph, "block0_x", "x")
    _rename(pruned.graph, f"block{last}_logits", "logits")
    for k in range(last):
        _rename(pruned.graph, f"block{k}_logits", f"logits_{k}")
    onnx.checker.check_model(pruned)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(pruned, out)
    return out
