"""The sequence model: the transformer as units, its split into blocks, and the sequence task end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgebll.export.exporter import build_blocks, plan_blocks
from edgebll.export.heads import TokenHead
from edgebll.export.models import build_model, transformer
from edgebll.export.transformer import TokenEmbedding, TransformerConfig, TransformerLayer


def test_the_zoo_model_is_the_papers_twenty_one_head_layers() -> None:
    spec = build_model("transformer")
    assert isinstance(spec.units[0], TokenEmbedding) and len(spec.units) == 21
    assert all(isinstance(u, TransformerLayer) for u in spec.units[1:])
    assert spec.input_shape == (10,) and spec.input_dtype == "int64" and spec.label_shape == (10,)
    assert spec.data == {"dataset": "reverse-permutation", "length": 10, "train_size": 16384, "test_size": 2048,
                         "seed": 0}
    tokens = torch.randperm(10).repeat(3, 1)
    h = spec.units[0](tokens)
    for unit in spec.units[1:]:
        h = unit(h)
    assert h.shape == (3, 10, 64)


@pytest.mark.parametrize("blocks", [2, 4, 5, 10, 20])
def test_blocks_split_the_twenty_layers_evenly(blocks: int) -> None:
    spec = build_model("transformer")
    modules, in_shapes, groups = build_blocks(spec, "bll", blocks)
    layers_per_block = [len([u for u in group if u > 0]) for group in groups]
    assert layers_per_block == [20 // blocks] * blocks
    assert groups[0][0] == 0, "the embedding is part of the first block"
    assert in_shapes[0] == (10,) and all(shape == (10, 64) for shape in in_shapes[1:])
    assert all(isinstance(m.head, TokenHead) for m in modules)


def test_bll_graphs_have_one_latent_per_token() -> None:
    spec = transformer(TransformerConfig(layers=2, d_model=8, d_ff=16))
    plans = plan_blocks(spec, "bll", 2)
    forward, last, feedback = plans
    assert [(i.name, i.shape, i.dtype) for i in forward.inputs] == [("x", (10,), "int64"),
                                                                    ("prior", (10, 10), "float32")]
    assert [(i.name, i.shape, i.dtype) for i in last.inputs] == [("x", (10, 8), "float32"),
                                                                 ("labels", (10,), "int64")]
    assert [(i.name, i.shape) for i in feedback.inputs] == [("beta", (10, 10)), ("target", (10, 10))]
    loss, logits, y, kl = forward.module(torch.randint(0, 10, (4, 10)), torch.zeros(4, 10, 10))
    assert logits.shape == (4, 10, 10) and y.shape == (4, 10, 8) and loss.dim() == kl.dim() == 0


@pytest.mark.slow
def test_the_sequence_task_trains_through_the_cli(tmp_path: Path) -> None:
    """export -> train -> eval with no data folder: run.json says which dataset, and accuracy is per token."""
    run = tmp_path / "t"

    def edgebll(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "edgebll", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    edgebll("export", "--model", "transformer", "--method", "bll", "--blocks", "4", "--out", str(run), "--no-progress",
            "--no-portable")
    edgebll("train", str(run), "--epochs", "2", "--limit", "2048", "--threads", "1", "--no-progress")
    edgebll("eval", str(run), "--limit", "512", "--threads", "1", "--no-progress")
    config = json.loads((run / "run.json").read_text())
    train = json.loads((run / "train.json").read_text())
    evaluation = json.loads((run / "eval.json").read_text())
    assert config["data"]["dataset"] == "reverse-permutation" and config["head"] == "token"
    assert train["steps"] == 64 and train["samples"] == 2 * 2048
    assert evaluation["samples"] == 512 and len(evaluation["per_block_accuracy"]) == 4
    # chance is 10 % per token; a broken per-token loss, latent or accuracy count stays near it. Measured after
    # these 64 steps (lr 2e-3): 100 % on every block.
    assert evaluation["test_accuracy"] >= 0.6, evaluation
    # the deployable chain takes token ids and gives per-token logits: the same accuracy as eval's
    edgebll("export-inference", str(run), "--out", str(tmp_path / "t.onnx"))
    import onnxruntime

    from edgebll.sequence_data import ReversalTask, load_reversal

    test = load_reversal("test", ReversalTask.from_dict(config["data"]), limit=512)
    logits = onnxruntime.InferenceSession(str(tmp_path / "t.onnx")).run(None, {"x": test.tokens})[0]
    assert logits.shape == (512, 10, 10)
    assert (logits.argmax(-1) == test.targets).mean() == pytest.approx(evaluation["test_accuracy"], abs=2e-3)


def test_validation_split_counts_tokens_on_the_sequence_task(tmp_path: Path) -> None:
    """--val-split holds out the last training sequences; validation and eval count accuracy per token, with
    the per-token prior ([T, C]) zero, and cutout (images only) is refused with a hint."""
    from edgebll.errors import EdgeBLLError
    from edgebll.export import export_model
    from edgebll.runtime import Runtime
    from edgebll.sequence_data import ReversalTask, SequenceDataset, load_reversal

    run = export_model(transformer(TransformerConfig(layers=2, d_model=8, d_ff=16)), out=tmp_path / "t",
                       method="bll", blocks=2, batch_size=16, progress=False, portable=False)
    train = load_reversal("train", ReversalTask(), limit=96)
    summary = Runtime.from_run(run, threads=1).train(data=train, epochs=1, val_split=32, progress=False)
    assert summary["samples"] == 64
    accuracy = summary["epochs"][-1]["validation_accuracy"]
    # 32 sequences x 10 tokens, counted per token: a count divided by the 32 sequences would pass 1
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    assert all(abs(a * 320 - round(a * 320)) < 0.01 for a in accuracy)  # a multiple of 1/320 (rounded to 5 places)
    held_out = SequenceDataset(train.tokens[64:], train.targets[64:])
    again = Runtime.from_run(run, threads=1).evaluate(data=held_out, progress=False)
    assert again["per_block_accuracy"] == accuracy
    with pytest.raises(EdgeBLLError, match=r"--cutout zeroes squares of images .* hint: drop --cutout"):
        Runtime.from_run(run, threads=1).train(data=train, epochs=1, cutout=4, progress=False)
