"""The portable training step (one standard-op ONNX graph per block) against onnxruntime-training and torch.

SGD steps are compared at 1e-5: plain gradients times the learning rate, so the test sees every
gradient the graph computes. AdamW's first steps divide each gradient by its own magnitude, so a
gradient that is zero up to rounding (a dead ReLU, a padded border) becomes a step of ±lr whose sign
is the rounding's: two exact implementations then differ by 2·lr there. The AdamW tests use eps = 1,
which keeps every term of torch's formula (moments, bias correction, decoupled weight decay) but
scales such a step by the gradient's size, so they compare at 1e-5 too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import portable_units
import torch
from torch import nn

from edgebll.errors import EdgeBLLError, ExportError
from edgebll.export import OptimizerConfig, export_model
from edgebll.export.local_block import LocalBlock
from edgebll.export.portable import export_portable
from edgebll.export.artifacts import GraphInput
from edgebll.graph_memory import _infer_shapes
from edgebll.manifest import load_block_manifest
from edgebll.portable_schema import PORTABLE_FILES
from edgebll.ort_training import training_available
from edgebll.portable import PortableRunner
from edgebll.runner import BlockRunner
from edgebll.runtime import Runtime

BATCH = 8
LR = 1e-2


def _inputs(manifest, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    classes = int(manifest.output("logits").shape[-1])
    for spec in manifest.inputs:
        shape = [BATCH, *spec.per_sample_shape()]
        if spec.dtype == "int64":
            arrays.append(rng.integers(0, classes, shape).astype(np.int64))
        elif spec.role == "target":
            arrays.append(np.eye(classes, dtype=np.float32)[rng.integers(0, classes, shape[:-1])])
        else:
            arrays.append(rng.standard_normal(shape).astype(np.float32))
    return arrays[0], arrays[1]


def _block_dirs(run: Path) -> list[Path]:
    return sorted(run.glob("block-*")) + sorted(run.glob("block-*/feedback"))


def _torch_step(module: nn.Module, x: np.ndarray, side: np.ndarray) -> list[np.ndarray]:
    """One SGD step of the torch block in place; returns its outputs before the update."""
    module.train()
    module.zero_grad()
    outputs = module(torch.from_numpy(x), torch.from_numpy(side))
    outputs[0].backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return [o.detach().numpy() for o in outputs]


FLIP_SHARE = 0.005
"""Share of a tensor's elements that may differ by more than the tolerance (see ``assert_near``)."""
FLIP_CAP = 1e-3


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """Elementwise |got - want| <= tol·(1 + |want|)."""
    return np.abs(np.asarray(got) - np.asarray(want)) <= tol + tol * np.abs(np.asarray(want))


def assert_near(got: np.ndarray | float, want: np.ndarray | float, what: str, tol: float = 1e-5) -> None:
    """Every element within ``tol`` (relative and absolute), but for at most 0.5 % of a tensor's elements,
    which stay within 1e-3.

    Two exact float32 implementations round differently (1e-7), and a ReLU whose input lies within
    that rounding of 0 (seen: 8.3e-7 in torch, 0 in onnxruntime, one of 800,000 of a vgg8b block's)
    passes or blocks the gradient of its element: the weight gradient of that output channel then
    moves by a few percent of one update, and the channel's outputs by ~1e-4 from the next step on.
    A scalar (a loss) has no such allowance.
    """
    near = _close(got, want, tol)
    assert _close(got, want, FLIP_CAP).all(), (
        f"{what}: off by {np.abs(np.asarray(got) - np.asarray(want)).max():.2e}, more than any rounding explains")
    assert (1 - near.mean()) <= (FLIP_SHARE if near.size > 1 else 0.0), (
        f"{what}: {near.size - near.sum()} of {near.size} elements differ by more than {tol}")


def assert_same_steps(block_dir: Path, module: nn.Module, steps: int = 4) -> None:
    """``steps`` SGD steps of the portable graph equal torch autograd's and onnxruntime-training's (``assert_near``).

    Each step starts the three from the portable graph's weights and BatchNorm statistics, so every
    step is compared on its own: loss, logits, message and metric, then every updated weight and
    running statistic. (Along separate trajectories, one ReLU flip in a small-batch BatchNorm block
    grows by orders of magnitude within a few steps, and the comparison would measure that growth.)
    """
    ort, portable = BlockRunner(block_dir, load_trained=False), PortableRunner(block_dir, load_trained=False)
    rng = np.random.default_rng(0)
    roles = [t.role for t in portable.manifest.outputs if t.role != "bn_stat"]
    names = set(ort.parameters())
    assert names <= set(portable.parameters())  # ours adds BatchNorm's num_batches_tracked
    assert {s.parameter for s in ort.manifest.bn_stats} <= names  # the running statistics are compared too
    for step in range(steps):
        start = portable.parameters()
        module.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()}, strict=False)
        for name in names:  # ORT keeps a scalar parameter as [1]
            ort.state.parameters[name] = start[name].reshape(ort.state.parameters[name].data.shape)
        x, side = _inputs(ort.manifest, rng)
        theirs, ours = ort.train_step(x, side, LR), portable.train_step(x, side, LR)
        reference = dict(zip(roles, _torch_step(module, x, side)))
        where = f"{block_dir.name} step {step}"
        for role, got, other in (("loss", ours.loss, theirs.loss), ("logits", ours.logits, theirs.logits),
                                 ("message", ours.message, theirs.message), ("metric", ours.metric, theirs.metric)):
            if role in reference:
                assert_near(got, reference[role], f"{where}: {role} against torch")
                assert_near(got, other, f"{where}: {role} against onnxruntime-training")
        updated, trained = portable.parameters(), ort.parameters()
        expected = {k: v.detach().numpy() for k, v in [*module.named_parameters(), *module.named_buffers()]}
        for name, value in updated.items():
            assert_near(value, expected[name], f"{where}: {name} against torch")
        for name in names:
            assert_near(updated[name], trained[name], f"{where}: {name} against onnxruntime-training")
    x, side = _inputs(ort.manifest, rng)
    for name in names:
        ort.state.parameters[name] = portable.parameters()[name].reshape(ort.state.parameters[name].data.shape)
    assert_near(portable.eval_step(x, side).logits, ort.eval_step(x, side).logits, f"{block_dir.name}: eval logits")


def _modules(model, method: str, blocks: int, **options) -> dict[str, nn.Module]:
    """The torch module of every graph of an export, by its folder relative to the run (seeded as export_model)."""
    from edgebll.export.exporter import plan_blocks
    from edgebll.export.models import build_model

    torch.manual_seed(0)
    plans = plan_blocks(build_model(model, **options), method, blocks)
    return {f"block-{p.index}" + ("/feedback" if p.kind == "feedback" else ""): p.module for p in plans}


ZOO = [
    ("cnn-small", "bwbpf", 2),
    ("cnn-small", "bll", 2),
    ("cnn-small", "predsim", 2),
    ("cnn-small", "bp", 1),
    ("resnet18", "bwbpf", 2),
    ("vgg8b", "bwbpf", 2),
    ("transformer", "bll", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("model,method,blocks", ZOO, ids=[f"{m}-{k}" for m, k, _ in ZOO])
def test_zoo_portable_steps_match_ort_training(tmp_path: Path, model: str, method: str, blocks: int) -> None:
    run = export_model(model, out=tmp_path / "run", method=method, blocks=blocks, batch_size=BATCH, optimizer="sgd",
                       progress=False)
    modules = _modules(model, method, blocks)
    for block_dir in _block_dirs(run):
        manifest = load_block_manifest(block_dir)
        assert manifest.backends() == ["ort-training", "portable"]
        for name in PORTABLE_FILES:
            assert name in manifest.files
        assert_same_steps(block_dir, modules[str(block_dir.relative_to(run))])


def test_portable_graphs_use_standard_ops_only(tiny_portable_run: Path) -> None:
    for block_dir in _block_dirs(tiny_portable_run):
        for name in ("portable_train.onnx", "portable_eval.onnx"):
            model = onnx.load(str(block_dir / name))
            assert model.ir_version <= 10  # onnxruntime 1.19.2 loads IR <= 10
            assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
            assert "Constant" not in {n.op_type for n in model.graph.node}  # folded at export
            batch = model.graph.input[0].type.tensor_type.shape.dim[0]
            assert batch.dim_param, f"{name}: the batch axis is fixed at {batch.dim_value}"


def test_user_units_sgd_match_ort_training_and_torch(tiny_portable_run: Path) -> None:
    modules = _modules(portable_units(), "bwbpf", 2)
    for block_dir in _block_dirs(tiny_portable_run):
        assert_same_steps(block_dir, modules[block_dir.name])


def test_adamw_matches_ort_training_and_torch(tmp_path: Path) -> None:
    """torch.optim.AdamW's formula, weight decay included, in both backends and in torch itself."""
    torch.manual_seed(0)
    units = [nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh())]
    optimizer = OptimizerConfig(name="adamw", eps=1.0, weight_decay=0.1)
    run = export_model(units, out=tmp_path / "run", blocks=1, method="bp", batch_size=BATCH, input_shape=(3, 4),
                       optimizer=optimizer, progress=False)

    # the same four steps in torch, from the exported weights
    from edgebll.export.exporter import plan_blocks
    from edgebll.export.models import build_model

    torch.manual_seed(0)
    module = plan_blocks(build_model(units, input_shape=(3, 4), num_classes=10), "bp", 1)[0].module
    portable = PortableRunner(run / "block-0", load_trained=False)
    ort = BlockRunner(run / "block-0", load_trained=False)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in portable.parameters().items()})
    reference = torch.optim.AdamW(module.parameters(), lr=LR, eps=1.0, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(4):
        x, labels = _inputs(portable.manifest, rng)
        ours, theirs = portable.train_step(x, labels, LR), ort.train_step(x, labels, LR)
        assert _close(ours.loss, theirs.loss) and _close(ours.logits, theirs.logits).all()
        reference.zero_grad()
        module(torch.from_numpy(x), torch.from_numpy(labels))[0].backward()
        reference.step()
    for name, value in ort.parameters().items():
        assert _close(portable.parameters()[name], value).all(), name
    state = portable.state_arrays()
    for name, p in module.named_parameters():
        np.testing.assert_allclose(state[f"param:{name}"], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        moments = reference.state[p]
        np.testing.assert_allclose(state[f"exp_avg:{name}"], moments["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state[f"exp_avg_sq:{name}"], moments["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


def assert_sgd_step_like_torch(units: list[nn.Module], head: nn.Module, shape: tuple[int, ...], tmp_path: Path) -> None:
    """One SGD step of the portable graph of ``units`` + ``head`` (input ``[BATCH, *shape]``) equals torch autograd's."""
    import onnxruntime

    block = LocalBlock(units, head, emits_message=True)
    inputs = [GraphInput("x", shape, "float32", "message"), GraphInput("labels", (), "int64", "labels")]
    outputs = [("loss", "loss"), ("logits", "logits"), ("y", "message")]
    schema = export_portable(block, inputs, outputs, tmp_path, OptimizerConfig(name="sgd"), where="block 0")
    session = onnxruntime.InferenceSession(str(tmp_path / "portable_train.onnx"))
    state = np.load(tmp_path / "portable_state.npz")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, *shape)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH).astype(np.int64)
    feeds = {"x": x, "labels": labels, "lr": np.array(LR, np.float32), "step": np.array(1, np.float32)}
    feeds |= {k: state[k] for k in schema.state_keys()}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    loss, logits, y = block.train()(torch.from_numpy(x), torch.from_numpy(labels))
    loss.backward()
    np.testing.assert_allclose(got["loss"], loss.item(), rtol=1e-6)
    np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-5, atol=1e-6)
    for name, p in block.named_parameters():
        expected = (p - LR * p.grad).detach().numpy()
        np.testing.assert_allclose(got[f"next:param:{name}"], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, b in block.named_buffers():
        np.testing.assert_allclose(got[f"next:buffer:{name}"], b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_without_ort_gradient_trains_like_torch(tmp_path: Path) -> None:
    """Hardswish has no gradient in ORT's builder; the portable graph's SGD step equals torch autograd's."""
    torch.manual_seed(0)
    units = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
             nn.Hardsigmoid()]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    assert_sgd_step_like_torch(units, head, (1, 9, 9), tmp_path)


def test_group_and_instance_norm_train_like_torch(tmp_path: Path) -> None:
    """GroupNorm and InstanceNorm become ONNX InstanceNormalization, which ORT's builder cannot differentiate."""
    torch.manual_seed(0)
    units = [nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
             nn.InstanceNorm2d(4, affine=True), nn.ReLU()]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    assert_sgd_step_like_torch(units, head, (1, 9, 9), tmp_path)


def test_batch_norm_variants_train_like_torch(tmp_path: Path) -> None:
    """Batch norm without affine, with another momentum and eps, without running statistics, and BatchNorm1d on
    features, each as torch trains it. A cumulative average (momentum None) reads a tensor as a Python number, which
    the tracer cannot follow: refused, naming the layer."""
    torch.manual_seed(0)
    units = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 4, 3),
             nn.BatchNorm2d(4, momentum=0.3, eps=1e-3), nn.ReLU(), nn.Conv2d(4, 4, 1),
             nn.BatchNorm2d(4, track_running_stats=False)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 10))
    assert_sgd_step_like_torch(units, head, (1, 9, 9), tmp_path)
    units[4] = nn.BatchNorm2d(4, momentum=None)
    with pytest.raises(ExportError, match=r"block 0: body.4 \(BatchNorm2d\) has momentum=None .*hint: give it a momentum"):
        assert_sgd_step_like_torch(units, head, (1, 9, 9), tmp_path)


def test_a_block_the_training_build_cannot_differentiate_is_exported_portable_only(tmp_path: Path) -> None:
    """The other blocks keep both backends; ``auto`` trains this one on the portable graphs. Without them (and
    for a layer torch.onnx cannot export in training mode) the export is refused naming the layer and the fix."""
    units = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
             nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Hardswish())]
    run = export_model(units, out=tmp_path / "run", blocks=2, batch_size=BATCH, progress=False)
    assert [load_block_manifest(run / f"block-{k}").backends() for k in (0, 1)] == [["ort-training", "portable"],
                                                                                   ["portable"]]
    assert json.loads((run / "run.json").read_text())["backends"] == ["portable"]
    assert "no gradient for HardSwish" in (run / "block-1" / "export.log").read_text()
    runtime = Runtime.from_run(run, threads=1)
    assert [r.backend for r in runtime.runners] == ["ort-training" if training_available() else "portable",
                                                    "portable"]
    with pytest.raises(ExportError, match=r"block 1 \(units \['unit1'\]\): onnxruntime-training has no gradient for "
                                          r"HardSwish, which body.0.1 \(Hardswish\) becomes; hint: export with "
                                          r"--portable .* or use nn.ReLU or nn.SiLU"):
        export_model(units, out=tmp_path / "no-portable", blocks=2, batch_size=BATCH, progress=False, portable=False)
    units[1] = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Dropout2d(0.1))
    with pytest.raises(ExportError, match=r"body.0.1 \(Dropout2d\) cannot be exported in training mode "
                                          r"\(aten::feature_dropout\); hint: use nn.Dropout"):
        export_model(units, out=tmp_path / "dropout", blocks=2, batch_size=BATCH, progress=False)
    assert not (tmp_path / "no-portable").exists() and not (tmp_path / "dropout").exists()


def test_a_host_without_the_training_build_exports_the_portable_graphs_alone(tmp_path: Path,
                                                                            tiny_portable_run: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An aarch64 host, or a GPU machine with onnxruntime-gpu, has no onnxruntime-training: the export writes the
    portable graphs alone, the same ones as with it; --no-portable, which would write nothing it can train, is
    refused and leaves no folder behind."""
    import edgebll.export.exporter as exporter

    monkeypatch.setattr(exporter, "training_available", lambda: False)
    torch.manual_seed(0)  # as tiny_portable_run was exported
    run = export_model(portable_units(), out=tmp_path / "run", blocks=2, batch_size=8, optimizer="sgd", lr=0.05,
                       progress=False)
    assert json.loads((run / "run.json").read_text())["backends"] == ["portable"]
    for k in (0, 1):
        assert load_block_manifest(run / f"block-{k}").backends() == ["portable"]
        assert not (run / f"block-{k}" / "training_model.onnx").exists()
        assert "onnxruntime-training is not installed: portable graphs only" in \
            (run / f"block-{k}" / "export.log").read_text()
        alone, both = (PortableRunner(r / f"block-{k}", threads=1, load_trained=False) for r in (run, tiny_portable_run))
        x, labels = _inputs(alone.manifest, np.random.default_rng(k))
        assert alone.train_step(x, labels, 0.05).loss == both.train_step(x, labels, 0.05).loss
        mine, theirs = alone.parameters(), both.parameters()
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[n], theirs[n]) for n in mine)
    assert [r.backend for r in Runtime.from_run(run, threads=1).runners] == ["portable", "portable"]
    with pytest.raises(ExportError, match=r"block 0 \(units \['unit0', 'unit1'\]\): --no-portable writes only the "
                                          r"training build's artifacts, which need onnxruntime-training, and it is "
                                          r"not installed; hint: export with --portable"):
        export_model(portable_units(), out=tmp_path / "no-portable", blocks=2, batch_size=8, progress=False,
                     portable=False)
    assert not (tmp_path / "no-portable").exists()


@pytest.mark.parametrize("dims", [1, 2])
def test_convolution_weight_gradients_in_every_form_equal_torch(tmp_path: Path, dims: int) -> None:
    """Weight gradients in each of their forms: an im2col product (2 input channels); per-sample products (16
    channels, 100+ output positions: dilation, a non-square kernel, a 1×1 kernel); one product per offset (the last
    conv, under 100 positions); products over stride phases (the first strided conv, 2-D only); and the convolution
    form (1-D strided, strided 3×3 under 100 positions, grouped, strided grouped, one input channel). Input gradients:
    stride 1 a flipped-kernel Conv (grouped too), stride 2 a ConvTranspose."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    k = lambda *sizes: sizes[:dims]  # noqa: E731 (a kernel or padding in 1 or 2 dimensions)
    torch.manual_seed(0)
    units = [conv(2, 16, 3, padding=1), nn.ReLU(), conv(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
             conv(16, 16, k(3, 1), padding=k(1, 0)), nn.ReLU(), conv(16, 16, 3, stride=2, padding=1), nn.ReLU(),
             conv(16, 16, 3, padding=1, groups=4), nn.ReLU(), conv(16, 1, 1), conv(1, 16, 3, padding=1), nn.ReLU(),
             conv(16, 16, 3, stride=2, groups=4), nn.ReLU(), conv(16, 16, 3, stride=2, padding=1), nn.ReLU(),
             conv(16, 16, 3, padding=1), nn.ReLU()]
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    # positions, 2-D: 25×21, after each stride 2 13×11, 6×5, 3×3; 1-D: 250, 125, 62, 31
    assert_sgd_step_like_torch(units, nn.Sequential(pool, nn.Flatten(), nn.Linear(16, 10)), (2, *k(25, 21)) if dims == 2
                               else (2, 250), tmp_path)


def test_strided_weight_gradients_from_stride_phases_equal_torch(tmp_path: Path) -> None:
    """Strided weight gradients as products: per sample over every other row and column for a 1×1 kernel (57×55
    -> 29×28) and over runs of the input's stride phases (SpaceToDepth; a 4×4 kernel, 29×28 -> 14×14, whose last
    phase plane needs a row more, 32 channels in two groups); one product per offset for a 1×1 kernel under 100
    positions (14×14 -> 7×7); and the convolution form for a 3×3 kernel under 100 positions (7×7 -> 4×4)."""
    torch.manual_seed(0)
    units = [nn.Conv2d(32, 32, 1, stride=2), nn.Conv2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
             nn.Conv2d(16, 16, 1, stride=2), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()]
    assert_sgd_step_like_torch(units, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
                               (32, 57, 55), tmp_path)
    model = onnx.load(str(tmp_path / "portable_train.onnx"))
    phases = [n for n in model.graph.node if n.op_type == "SpaceToDepth"]
    assert len(phases) == 2
    # the memory estimate sizes them (the reshape into one-channel maps is computed from the batch)
    shapes, guessed = _infer_shapes(onnx, model, BATCH)
    assert [shapes[n.output[0]][0] for n in phases] == [[BATCH * 16, 4, 16, 15]] * 2
    assert not {n.output[0] for n in phases} & set(guessed)


def test_unsupported_layer_is_refused_at_export_naming_it(tmp_path: Path) -> None:
    units = [nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU()), nn.Sequential(nn.ConvTranspose2d(4, 4, 2), nn.ReLU())]
    out = tmp_path / "run"
    with pytest.raises(ExportError, match=r"block 1 \(units \['unit1'\]\).*transposed convolution"):
        export_model(units, out=out, blocks=2, batch_size=BATCH, progress=False)
    assert not out.exists()  # nothing half-written


def test_portable_runner_stops_before_the_update_on_a_non_finite_loss(tiny_portable_run: Path, tmp_path: Path) -> None:
    block_dir = Path(shutil.copytree(tiny_portable_run / "block-0", tmp_path / "block-0"))
    runner = PortableRunner(block_dir, load_trained=False)
    assert runner.schema.in_place  # the step writes over its state: a failed step must be undone
    before = runner.state_arrays()
    rng = np.random.default_rng(0)
    x, labels = _inputs(runner.manifest, rng)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(EdgeBLLError, match=r"block 0: local loss is nan at step 0 .* went back to "
                                           r"block-0/portable_state.npz \(step 0\)"):
        runner.train_step(x, labels, LR)
    after = runner.state_arrays()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert runner.progress["step"] == 0
    # after a save, back to what was saved
    for _ in range(2):
        runner.train_step(*_inputs(runner.manifest, rng), LR)
    runner.save(epoch=0)
    saved = runner.state_arrays()
    runner.train_step(*_inputs(runner.manifest, rng), LR)
    with pytest.raises(EdgeBLLError, match=r"local loss is nan at step 3 .* went back to trained/portable_state.npz "
                                           r"\(step 2\)"):
        runner.train_step(x, labels, LR)
    assert all(np.array_equal(saved[k], v) for k, v in runner.state_arrays().items())
    assert runner.progress["step"] == 2


def test_in_place_step_keeps_one_copy_of_the_state_and_equals_two(tiny_portable_run: Path) -> None:
    """The graph writes the next state into the buffers it was fed, with the same numbers as into a second copy."""
    from dataclasses import replace

    block_dir = tiny_portable_run / "block-0"
    in_place = PortableRunner(block_dir, load_trained=False)
    two_copies = PortableRunner(block_dir, load_trained=False)
    two_copies.schema = replace(two_copies.schema, in_place=False)
    where = {k: v.data_ptr() for k, v in in_place.state.items()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, labels = _inputs(in_place.manifest, rng)
        a, b = in_place.train_step(x, labels, LR), two_copies.train_step(x, labels, LR)
        assert a.loss == b.loss
    assert {k: v.data_ptr() for k, v in in_place.state.items()} == where
    assert any(two_copies.state[k].data_ptr() != p for k, p in where.items())
    expected = two_copies.state_arrays()
    assert all(np.array_equal(expected[k], v) for k, v in in_place.state_arrays().items())


def test_updates_wait_for_every_reader_of_what_they_overwrite(tiny_portable_run: Path) -> None:
    from edgebll.export.in_place import update_hazards

    model = onnx.load(str(tiny_portable_run / "block-0" / "portable_train.onnx"))
    assert update_hazards(model) == {}
    # without the added dependencies a layer's input-gradient conv may run after its weight's update
    kept = [n for n in model.graph.node if not n.name.startswith("after_reads/")]
    for node in kept:
        node.input[:] = ["lr" if name == "lr_after_reads" else name for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    hazards = update_hazards(model)
    assert hazards and all(key.startswith("param:") for key in hazards)
    assert any(key.endswith(".weight") for key in hazards)


def test_the_ordering_zero_is_a_scalar_from_reductions_that_keep_their_dims(tiny_portable_run: Path) -> None:
    """onnxruntime's CUDA kernel refuses to reduce an empty dimension away (keepdims=0), so the zeros that order
    the updates keep theirs, and one Reshape makes their sum the scalar that lr is."""
    model = onnx.load(str(tiny_portable_run / "block-0" / "portable_train.onnx"))
    sums = [n for n in model.graph.node if n.name.startswith("after_reads/") and n.op_type == "ReduceSum"]
    assert sums and all(onnx.helper.get_attribute_value(a) == 1 for n in sums for a in n.attribute if a.name == "keepdims")
    shapes = {v.name: v.type.tensor_type.shape for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert [d.dim_value for d in shapes[sums[0].output[0]].dim] == [1]
    assert len(shapes["lr_after_reads"].dim) == 0


def test_portable_checkpoint_round_trip(tiny_portable_run: Path, tmp_path: Path) -> None:
    block_dir = Path(shutil.copytree(tiny_portable_run / "block-0", tmp_path / "block-0"))
    runner = PortableRunner(block_dir)
    rng = np.random.default_rng(0)
    for _ in range(3):
        runner.train_step(*_inputs(runner.manifest, rng), LR)
    runner.save(epoch=1)
    reloaded = PortableRunner(block_dir)
    assert reloaded.progress == {"epoch": 1, "step": 3}
    saved, loaded = runner.state_arrays(), reloaded.state_arrays()
    assert all(np.array_equal(saved[k], loaded[k]) for k in saved)
    # every state tensor keeps the shape the graph declares (BatchNorm's step count is 0-d, not [1])
    declared = {i.name: i.shape for i in reloaded.train_session.get_inputs()}
    assert {k: list(a.shape) for k, a in loaded.items()} == {k: declared[k] for k in loaded}
    assert any(a.ndim == 0 for a in loaded.values())
    # the next step continues the same trajectory (the step count feeds AdamW's bias correction)
    x, labels = _inputs(runner.manifest, rng)
    # a state handed over as arrays (another machine's) continues the same trajectory too
    handed = PortableRunner(block_dir, load_trained=False)
    handed.load_state_arrays(saved, step=3)
    losses = [r.train_step(x, labels, LR).loss for r in (runner, reloaded, handed)]
    assert losses[0] == losses[1] == losses[2]
    after = runner.state_arrays()
    assert all(np.array_equal(after[k], v) for k, v in handed.state_arrays().items())
    with pytest.raises(EdgeBLLError, match="state .* has shape \\[1\\], the graph takes \\[\\]"):
        handed.load_state_arrays({k: np.atleast_1d(v) for k, v in saved.items()}, step=3)
    with pytest.raises(EdgeBLLError, match="a state needs exactly the keys"):
        handed.load_state_arrays({k: v for k, v in list(saved.items())[1:]}, step=3)
    assert PortableRunner(block_dir, load_trained=False).progress == {"epoch": 0, "step": 0}


def test_backend_choice_and_its_errors(run_copy: Path, tiny_portable_run: Path) -> None:
    from edgebll.backends import open_block, resolve_backend

    assert open_block(tiny_portable_run / "block-0").backend == "ort-training"  # auto, with the training build here
    assert open_block(tiny_portable_run / "block-0", backend="portable").backend == "portable"
    assert resolve_backend("auto", ["portable"]) == "portable"
    assert resolve_backend("auto", ["ort-training", "portable"], provider="cuda") == "portable"
    with pytest.raises(EdgeBLLError, match=r"has no portable files \(it offers \['ort-training'\]\); hint: re-export"):
        open_block(run_copy / "block-0", backend="portable")  # conftest's tiny_run is exported without them
    with pytest.raises(EdgeBLLError, match="unknown --backend 'tpu'"):
        resolve_backend("tpu", ["portable"])
    with pytest.raises(EdgeBLLError, match="--provider cuda: the onnxruntime-training backend runs on the CPU only"):
        resolve_backend("ort-training", ["ort-training"], provider="cuda")
    with pytest.raises(EdgeBLLError, match="this onnxruntime has no CUDAExecutionProvider"):
        PortableRunner(tiny_portable_run / "block-0", provider="cuda")


def test_a_cuda_provider_that_does_not_start_is_an_error_not_a_silent_cpu_run(tiny_portable_run: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    # an onnxruntime-gpu whose CUDA libraries do not load lists the provider, then runs the session on the CPU
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EdgeBLLError, match=r"--provider cuda: onnxruntime could not start CUDAExecutionProvider \(the "
                                           r"session runs on \['CPUExecutionProvider'\]\)"):
        PortableRunner(tiny_portable_run / "block-0", provider="cuda", provider_options={"use_tf32": "0"})


def test_runtime_on_the_portable_backend_resumes_to_the_uninterrupted_weights(tiny_portable_run: Path,
                                                                              tmp_path: Path) -> None:
    """In process, with cutout and a validation split: one epoch, then --resume for the second, ends where two
    epochs in one go end, byte for byte (a constant learning rate: a cosine schedule spans the epochs asked for)."""
    from edgebll.data import Dataset
    from edgebll.runtime import Runtime

    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((96, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 96).astype(np.int64))
    config = dict(data=data, codec="int8", cutout=8, val_split=32, schedule="constant", progress=False)
    straight = Path(shutil.copytree(tiny_portable_run, tmp_path / "straight"))
    runtime = Runtime.from_run(straight, backend="portable")
    assert [r.backend for r in runtime.all_runners] == ["portable", "portable"]
    summary = runtime.train(epochs=2, **config)
    assert summary["steps"] == 2 * 64 // BATCH and "validation_accuracy" in summary["epochs"][-1]
    halves = Path(shutil.copytree(tiny_portable_run, tmp_path / "halves"))
    Runtime.from_run(halves, backend="portable").train(epochs=1, **config)
    Runtime.from_run(halves, backend="portable").train(epochs=2, resume=True, **config)
    for k in range(2):
        a = PortableRunner(straight / f"block-{k}").state_arrays()
        b = PortableRunner(halves / f"block-{k}").state_arrays()
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    evaluation = Runtime.from_run(halves, backend="portable").evaluate(data=data, progress=False)
    assert len(evaluation["per_block_accuracy"]) == 2


def test_a_trained_block_continues_on_its_backend(tiny_portable_run: Path, tmp_path: Path) -> None:
    """auto follows the trained state; another backend is refused; --restart switches and drops the stale state."""
    from edgebll.backends import open_block

    block_dir = Path(shutil.copytree(tiny_portable_run / "block-0", tmp_path / "block-0"))
    rng = np.random.default_rng(0)
    runner = open_block(block_dir, backend="portable")
    runner.train_step(*_inputs(runner.manifest, rng), LR)
    runner.save(epoch=0)
    resumed = open_block(block_dir)  # auto: the training build is installed here, the state is portable's
    assert resumed.backend == "portable" and resumed.progress["step"] == 1
    with pytest.raises(EdgeBLLError, match=r"was trained on the portable backend \(trained/portable_state.npz\); "
                                           r"--backend ort-training cannot continue .* hint: --backend portable"):
        open_block(block_dir, backend="ort-training")
    restarted = open_block(block_dir, backend="ort-training", load_trained=False)
    restarted.train_step(*_inputs(restarted.manifest, rng), LR)
    restarted.save(epoch=0)
    assert sorted(p.name for p in (block_dir / "trained").iterdir()) == ["checkpoint", "checkpoint.json"]
    assert open_block(block_dir).backend == "ort-training"


def test_portable_export_inference_gives_the_blocks_eval_logits(tiny_portable_run: Path, tmp_path: Path) -> None:
    """A run trained on the portable backend: the merged chain (trained weights and BatchNorm statistics baked
    in) equals the blocks' eval steps run one by one."""
    import onnxruntime as ort

    from edgebll.cli import main
    from edgebll.data import Dataset
    from edgebll.runtime import Runtime

    rng = np.random.default_rng(1)
    data = Dataset(rng.standard_normal((48, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 48).astype(np.int64))
    run = Path(shutil.copytree(tiny_portable_run, tmp_path / "run"))
    runtime = Runtime.from_run(run, backend="portable")
    runtime.train(data=data, epochs=1, progress=False)
    assert main(["export-inference", str(run), "--out", str(tmp_path / "m.onnx")]) == 0  # auto finds the state
    x = data.images[:12]
    h = x
    for runner in runtime.runners:
        result = runner.eval_step(h, np.zeros(len(x), np.int64))
        h = result.message
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    np.testing.assert_allclose(session.run(["logits"], {"x": x})[0], result.logits, atol=1e-5)


def test_memory_estimate_reads_the_portable_graph(tiny_portable_run: Path) -> None:
    from edgebll.memory import PORTABLE_RUNTIME_BYTES, estimate_peak_bytes

    block = tiny_portable_run / "block-0"
    schema = load_block_manifest(block).portable
    with np.load(block / "portable_state.npz") as state:
        model_bytes = sum(state[k].nbytes for k in schema.model_keys())
    portable = estimate_peak_bytes(block, 32, backend="portable")
    trained = estimate_peak_bytes(block, 32, backend="ort-training")
    assert portable.parameters == model_bytes  # weights and BatchNorm statistics, as fed to the graph
    assert portable.gradients == 0 and portable.optimizer_state == 0  # transient in the one graph; SGD keeps none
    assert portable.runtime == PORTABLE_RUNTIME_BYTES
    # the next state goes over the current one, but every gradient is alive before the first update
    assert schema.in_place and portable.activations >= model_bytes
    assert trained.gradients > 0 and portable.activations != trained.activations
    assert estimate_peak_bytes(block, 64, backend="portable").activations > portable.activations
    with pytest.raises(EdgeBLLError, match="unknown backend 'tpu'"):
        estimate_peak_bytes(block, backend="tpu")


def test_adamw_keeps_at_most_two_weight_sized_temporaries(tmp_path: Path) -> None:
    """A block whose weight dwarfs its activations: the step's liveness peak is two copies of the weight (the
    update's temporaries), not three or more (the gradient held beside two, or a denominator held through
    the backward). test_adamw_matches_ort_training_and_torch checks the update's numbers."""
    from edgebll.memory import estimate_peak_bytes

    torch.manual_seed(0)
    units = [nn.Sequential(nn.Flatten(), nn.Linear(12, 512), nn.Tanh()), nn.Sequential(nn.Linear(512, 512), nn.Tanh())]
    run = export_model(units, out=tmp_path / "run", blocks=1, method="bp", batch_size=BATCH, input_shape=(3, 4),
                       optimizer=OptimizerConfig(name="adamw"), progress=False)
    weight = 512 * 512 * 4
    activations = estimate_peak_bytes(run / "block-0", BATCH, backend="portable").activations
    assert 2 * weight <= activations < 2.5 * weight
    model = onnx.load(str(run / "block-0" / "portable_train.onnx"))
    producer = {name: node for node in model.graph.node for name in node.output}
    ordered, stack = set(), ["lr_after_reads"]
    while stack:  # everything the updates wait for
        node = producer.get(stack.pop())
        if node is not None and node.name not in ordered:
            ordered.add(node.name)
            stack.extend(node.input)
    roots = [n.name for n in model.graph.node if n.op_type == "Sqrt" and n.input[0].startswith("next:exp_avg_sq:")]
    assert roots and not ordered.intersection(roots)  # the denominators are made after the barrier, not held


def test_adamw_with_torch_default_eps_keeps_parameters_without_gradient(tmp_path: Path) -> None:
    """A hidden unit that no sample activates gets a zero gradient: torch's AdamW leaves it (0 / (0 + eps)).

    (onnxscript's graph optimizer once dropped the "+ eps" and made it 0 / 0.)
    """
    import onnxruntime

    from edgebll.export.local_block import FeedbackBlock

    torch.manual_seed(0)
    block = FeedbackBlock(10, 8)  # no skip: its gradient would be rounding noise, which AdamW turns into ±lr
    specs = [GraphInput("beta", (10,), "float32", "message"), GraphInput("target", (8,), "float32", "target")]
    schema = export_portable(block, specs, [("loss", "loss"), ("logits", "logits"), ("beta_out", "message")], tmp_path,
                             OptimizerConfig(name="adamw"), where="feedback block 0")
    beta = np.eye(10, dtype=np.float32)[np.random.default_rng(0).integers(0, 10, BATCH)]
    target = beta[:, :8]
    state = np.load(tmp_path / "portable_state.npz")
    feeds = {"beta": beta, "target": target, "lr": np.array(LR, np.float32), "step": np.array(1, np.float32)}
    feeds |= {k: state[k] for k in schema.state_keys()}
    session = onnxruntime.InferenceSession(str(tmp_path / "portable_train.onnx"))
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    reference = torch.optim.AdamW(block.parameters(), lr=LR, weight_decay=0.0)  # OptimizerConfig's default
    block(torch.from_numpy(beta), torch.from_numpy(target))[0].backward()
    assert any((p.grad == 0).any() for p in block.parameters())  # the case this test is about
    reference.step()
    for name, p in block.named_parameters():
        np.testing.assert_allclose(got[f"next:param:{name}"], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dims", [1, 2])
def test_average_pooling_gradients_equal_torch(tmp_path: Path, dims: int) -> None:
    """Average pools (padding counted or not, a divisor) and adaptive pools to sizes that do not divide the input:
    their backward has no ONNX translation and is built from matrix products. (Ceil mode is left to the next test:
    onnxruntime's forward of a ceil-mode window that runs past the input differs from torch's.)"""
    pool, adaptive = (nn.AvgPool1d, nn.AdaptiveAvgPool1d) if dims == 1 else (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(0)
    units = [conv(2, 4, 3, padding=1), nn.ReLU(), pool(3, stride=2, padding=1, count_include_pad=False), conv(4, 4, 1),
             pool(3, stride=1, padding=1), conv(4, 4, 1), adaptive(3), nn.ReLU()]
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 ** dims, 10))
    assert_sgd_step_like_torch(units, head, (2, *(13, 11)[:dims]), tmp_path)


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, count_include_pad, divisor", [
    (2, 2, 0, False, True, None), (3, 2, 1, False, False, None), (3, 2, 1, True, True, None),
    (3, 2, 1, True, False, None), (2, 3, 0, True, True, None), ((3, 2), (1, 2), (1, 0), False, True, 5),
])
def test_average_pool_backward_decomposition_equals_aten(kernel, stride, padding, ceil_mode, count_include_pad,
                                                         divisor) -> None:
    from edgebll.export.pool_gradients import adaptive_avg_pool2d_backward, avg_pool2d_backward

    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    y = torch.nn.functional.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    grad = torch.randn_like(y)
    args = (list(np.atleast_1d(kernel)), list(np.atleast_1d(stride)), list(np.atleast_1d(padding)), ceil_mode,
            count_include_pad, divisor)
    expected = torch.ops.aten.avg_pool2d_backward(grad, x, *args)
    torch.testing.assert_close(avg_pool2d_backward(grad, x, *args), expected)
    for size in [(4, 3), (9, 8), (2, 5)]:
        y = torch.nn.functional.adaptive_avg_pool2d(x, size)
        grad = torch.randn_like(y)
        torch.testing.assert_close(adaptive_avg_pool2d_backward(grad, x),
                                   torch.ops.aten._adaptive_avg_pool2d_backward(grad, x))
