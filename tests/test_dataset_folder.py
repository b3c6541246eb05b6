"""Dataset folders: the user's own arrays imported, checked, normalised, and trained on from the CLI and Python."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebll.cli import main
from edgebll.dataset_folder import import_npz, load_dataset_folder, read_dataset_info, write_dataset_folder
from edgebll.errors import DataError

CLASSES = 4


def _images(n: int, seed: int, shape: tuple[int, ...] = (3, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose label lights a corner of one channel: a few steps learn it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = (rng.random((n, *shape)) * 60).astype(np.uint8)
    x[np.arange(n), y % shape[0], :8, :8] += 150
    return x, y


def test_import_round_trip_normalises_per_channel_and_limits_before_converting(tmp_path: Path) -> None:
    train, test = _images(64, 0), _images(16, 1)
    folder = write_dataset_folder(tmp_path / "cam", {"train": train, "test": test}, classes=list("abcd"))
    info = read_dataset_info(folder)
    assert (info.sample_shape, info.dtype, info.num_classes, info.classes) == ((3, 32, 32), "uint8", 4, list("abcd"))
    scaled = train[0] / 255.0
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    np.testing.assert_allclose(info.mean, mean, atol=1e-6)
    np.testing.assert_allclose(info.std, std, atol=1e-6)
    data = load_dataset_folder(folder, "test", limit=5)
    x, y = data.arrays()
    assert x.dtype == np.float32 and x.shape == (5, 3, 32, 32) and y.dtype == np.int64
    expected = (test[0][:5] / 255.0 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(x, expected, atol=1e-5)
    np.testing.assert_array_equal(y, test[1][:5])


def test_windows_and_token_ids_keep_their_shape_and_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    windows = {s: (rng.standard_normal((n, 1, 128)).astype(np.float32), rng.integers(0, 3, n)) for s, n in
               (("train", 32), ("test", 8))}
    x = np.asarray(load_dataset_folder(write_dataset_folder(tmp_path / "imu", windows), "train").arrays()[0])
    assert x.shape == (32, 1, 128) and x.dtype == np.float32 and abs(float(x.mean())) < 0.1
    tokens = {s: (rng.integers(0, 50, (n, 10)), rng.integers(0, 10, (n, 10))) for s, n in (("train", 16), ("test", 4))}
    folder = write_dataset_folder(tmp_path / "tok", tokens, num_classes=10)
    info = read_dataset_info(folder)
    assert (info.input_dtype, info.label_shape, info.mean) == ("int64", (10,), None)
    x, y = load_dataset_folder(folder, "test").arrays()
    np.testing.assert_array_equal(x, tokens["test"][0])
    np.testing.assert_array_equal(y, tokens["test"][1])


@pytest.mark.parametrize("change, match", [
    (lambda t: (t[0], np.where(np.arange(len(t[1])) == 3, 7, t[1])), r"the train split: sample 3 has label 7, but there are 4 classes"),
    (lambda t: (t[0], np.where(np.arange(len(t[1])) == 2, -1, t[1])), r"the train split: sample 2 has a negative label"),
    (lambda t: (t[0].astype(np.float32) * np.where(np.arange(len(t[0])) == 5, np.nan, 1.0).astype(np.float32)
                .reshape(-1, 1, 1, 1), t[1]), r"sample 5 of x holds a non-finite value"),
    (lambda t: (t[0].astype(np.float64), t[1]), r"x has dtype float64; the samples must be uint8, float32 or int64"),
    (lambda t: (t[0], t[1][:-1]), r"y must hold integer labels \[N\] or \[N, T\] for the 16 samples of x"),
])
def test_bad_data_is_refused_at_import_naming_the_sample(tmp_path: Path, change, match: str) -> None:
    train = change(_images(16, 0))
    with pytest.raises(DataError, match=match):
        write_dataset_folder(tmp_path / "bad", {"train": train, "test": _images(8, 1)}, num_classes=CLASSES)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_npz_without_x_and_a_changed_file_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", images=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"train.npz: no array 'x' \(it has \['images', 'y'\]\)"):
        import_npz(tmp_path / "train.npz", tmp_path / "test.npz", tmp_path / "out")
    folder = write_dataset_folder(tmp_path / "cam", {"train": _images(16, 0), "test": _images(8, 1)})
    np.save(folder / "test_x.npy", _images(8, 2)[0])
    with pytest.raises(DataError, match=r"test_x.npy: sha256 .* does not match dataset.json"):
        load_dataset_folder(folder, "test")
    with pytest.raises(DataError, match=r"no dataset.json, so it is not a dataset folder"):
        read_dataset_info(tmp_path)


@pytest.mark.slow
def test_cli_imports_exports_trains_and_evaluates_own_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for split, (n, seed) in {"train": (256, 0), "test": (64, 1)}.items():
        x, y = _images(n, seed)
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
        np.savez(tmp_path / f"other-{split}.npz", x=_images(n, seed + 5)[0], y=y)
    data, run = tmp_path / "cam", tmp_path / "run"
    assert main(["data", "import", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--out",
                 str(data)]) == 0
    assert "256 train / 64 test samples of uint8 [3, 32, 32], 4 classes" in capsys.readouterr().out
    assert main(["export", "--model", "cnn-small", "--blocks", "2", "--batch-size", "32", "--data", str(data),
                 "--out", str(run), "--no-portable", "--no-progress"]) == 0
    config = json.loads((run / "run.json").read_text())
    assert (config["input_shape"], config["num_classes"], config["data"]["dataset"]) == ([3, 32, 32], 4, "folder")
    assert main(["train", str(run), "--epochs", "3", "--threads", "1", "--no-progress"]) == 0
    assert main(["eval", str(run), "--threads", "1", "--no-progress"]) == 0
    own = json.loads((run / "eval.json").read_text())
    assert own["samples"] == 64 and own["test_accuracy"] > 0.5  # chance is 0.25
    # other data: its own result file, and the run's eval.json stays
    other = tmp_path / "other"
    import_npz(tmp_path / "other-train.npz", tmp_path / "other-test.npz", other)
    assert main(["eval", str(run), "--data", str(other), "--threads", "1", "--no-progress"]) == 0
    assert json.loads((run / "eval.other.json").read_text())["result_file"] == "eval.other.json"
    assert json.loads((run / "eval.json").read_text()) == own
    # data of another shape: refused before the first step, saying what differs
    gray = write_dataset_folder(tmp_path / "gray", {"train": _images(16, 0, (1, 28, 28)), "test": _images(8, 1, (1, 28, 28))})
    assert main(["eval", str(run), "--data", str(gray), "--no-progress"]) == 2
    assert ("samples are float32 [1, 28, 28], but the run's first block takes float32 [3, 32, 32]"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_own_units_on_1d_windows_from_python(tmp_path: Path) -> None:
    from torch import nn

    from edgebll import Runtime
    from edgebll.export import export_model

    rng = np.random.default_rng(0)

    def windows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 1, 128)).astype(np.float32) * 0.3
        x[:, 0, :] += np.sin(np.linspace(0, 6.28, 128) * (1 + y[:, None])).astype(np.float32)
        return x, y

    data = write_dataset_folder(tmp_path / "imu", {"train": windows(256), "test": windows(64)})
    units = [nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU()), nn.Sequential(nn.Conv1d(8, 8, 5, padding=2), nn.ReLU()),
             nn.Sequential(nn.Conv1d(8, 8, 5, stride=4, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(256, 32), nn.ReLU())]
    run = export_model(units, out=tmp_path / "run", blocks=2, batch_size=32, head="linear", data=data, portable=False,
                       progress=False)
    runtime = Runtime.from_run(run, threads=1)
    runtime.train(epochs=4, progress=False)
    assert runtime.evaluate(progress=False)["test_accuracy"] > 0.6  # chance is 1/3


def test_zoo_image_models_take_the_images_size(tmp_path: Path) -> None:
    from edgebll.errors import ExportError
    from edgebll.export.models import build_model

    assert build_model("cnn-small", input_shape=(3, 32, 32), num_classes=4).input_shape == (3, 32, 32)
    assert build_model("resnet18", input_shape=(3, 40, 24)).input_shape == (3, 40, 24)
    with pytest.raises(ExportError, match=r"vgg8b pools an image down 16x and needs at least 16x16 pixels, got 8x8"):
        build_model("vgg8b", input_shape=(1, 8, 8))
    with pytest.raises(ExportError, match=r"cnn-small takes images \[C, H, W\], got samples of shape \[1, 128\]"):
        build_model("cnn-small", input_shape=(1, 128))


@pytest.mark.slow
def test_a_board_holds_a_batch_of_the_data_not_the_dataset(tmp_path: Path) -> None:
    """An epoch over 20,000 uint8 images (245 MB as float32): the process's anonymous memory grows by batches only.

    Measured in a fresh process from /proc/self/status: RssAnon leaves out the file's pages, which the
    kernel shares and can drop (the mapped file itself is 61 MB).
    """
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20_000, 3, 32, 32), dtype=np.uint8)
    folder = write_dataset_folder(tmp_path / "big", {"train": (x, rng.integers(0, 10, len(x))),
                                                     "test": (x[:64], np.zeros(64, np.int64))}, num_classes=10)
    del x
    script = f"""
import numpy as np
from edgebll.dataset_folder import load_dataset_folder
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
data = load_dataset_folder({str(folder)!r}, "train")
before, peak, seen = anon(), 0, 0
for x, y in data.batches(64, shuffle=True, seed=0, epoch=0):
    seen += len(x)
    peak = max(peak, anon())
print(seen, peak - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seen, growth = (int(v) for v in done.stdout.split())
    assert seen == 20_000
    assert growth < 16 * 2**20, f"anonymous memory grew by {growth / 2**20:.1f} MiB over the epoch"


@pytest.mark.slow
def test_mpi_trains_on_a_dataset_folder_as_in_process(tmp_path: Path) -> None:
    import shutil

    from edgebll.export import export_model
    from tests.test_worker import assert_same_weights, edgebll

    data = write_dataset_folder(tmp_path / "cam", {"train": _images(256, 0), "test": _images(32, 1)})
    run = export_model("cnn-small", out=tmp_path / "run", blocks=2, batch_size=16, data=data, portable=False,
                       progress=False)
    runs = {name: Path(shutil.copytree(run, tmp_path / name)) for name in ("inprocess", "mpi")}
    options = ["--limit", "128", "--threads", "1", "--no-progress"]
    done = edgebll("train", str(runs["inprocess"]), *options)
    assert done.returncode == 0, done.stderr
    done = edgebll("train", str(runs["mpi"]), "--transport", "mpi", "-n", "2", *options)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(runs["inprocess"], runs["mpi"], blocks=2)


def test_import_from_idx_files_and_from_folders_of_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from edgebll.data_import import import_any
    from tests.test_data import write_idx_file

    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 20), ("t10k", 6))}
    labels = {s: rng.integers(0, 10, len(images[s])).astype(np.uint8) for s in images}
    for prefix in images:
        write_idx_file(idx / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        write_idx_file(idx / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    folder = import_any(idx, tmp_path / "fm")
    info = read_dataset_info(folder)
    assert (info.sample_shape, info.counts) == ((1, 28, 28), {"train": 20, "test": 6})
    np.testing.assert_array_equal(load_dataset_folder(folder, "test").labels, labels["t10k"])

    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 10), color).save(tmp_path / split / cls / f"{i}.png")
    assert main(["data", "import", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--size", "8x6",
                 "--out", str(tmp_path / "pets")]) == 0
    assert "6 train / 4 test samples of uint8 [3, 8, 6], 2 classes" in capsys.readouterr().out
    info = read_dataset_info(tmp_path / "pets")
    assert info.classes == ["cat", "dog"]
    raw = np.load(tmp_path / "pets" / "test_x.npy")
    assert raw[0, 0].min() == 255 and raw[-1, 2].min() == 255  # a red cat first, a blue dog last
    np.testing.assert_array_equal(load_dataset_folder(tmp_path / "pets", "test").labels, [0, 0, 1, 1])
    with pytest.raises(DataError, match=r"a folder of images holds one split; give the test images with --test"):
        import_any(tmp_path / "train", tmp_path / "x")


@pytest.mark.slow
def test_fine_tuning_starts_where_the_source_ended(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--init-from a trained run: the same split evaluates exactly as the source before any step; another split
    gets the units; a state_dict of the units gives those weights; a mismatch is refused naming the key."""
    import torch
    from torch import nn

    from edgebll import Runtime
    from edgebll.errors import ExportError
    from edgebll.export import export_model
    from edgebll.export.models import build_model

    data = write_dataset_folder(tmp_path / "cam", {"train": _images(256, 0), "test": _images(64, 1)})
    options = dict(batch_size=32, data=data, portable=False, progress=False)
    source = export_model("cnn-small", out=tmp_path / "src", blocks=2, **options)
    Runtime.from_run(source, threads=1).train(epochs=1, progress=False)
    before = Runtime.from_run(source, threads=1).evaluate(codec="fp32", progress=False)
    assert main(["export", "--model", "cnn-small", "--blocks", "2", "--batch-size", "32", "--data", str(data),
                 "--init-from", str(source), "--out", str(tmp_path / "same"), "--no-portable", "--no-progress"]) == 0
    same = Runtime.from_run(tmp_path / "same", threads=1).evaluate(codec="fp32", progress=False)
    assert same["per_block_accuracy"] == before["per_block_accuracy"] and same["test_loss"] == before["test_loss"]
    assert json.loads((tmp_path / "same" / "run.json").read_text())["init_from"]["heads"] == 2
    # another split: every unit's weights, no head
    other = export_model("cnn-small", out=tmp_path / "k4", blocks=4, init_from=source, **options)
    from edgebll.runner import BlockRunner

    src0, new1 = BlockRunner(source / "block-0").parameters(), BlockRunner(other / "block-1").parameters()
    np.testing.assert_array_equal(new1["body.0.0.weight"], src0["body.1.0.weight"])  # stage1 moved to block 1
    # a state_dict of the units
    torch.manual_seed(5)
    units = nn.Sequential(*build_model("cnn-small", input_shape=(3, 32, 32), num_classes=4).units)
    torch.save(units.state_dict(), tmp_path / "units.pt")
    run = export_model("cnn-small", out=tmp_path / "sd", blocks=2, init_from=tmp_path / "units.pt", **options)
    np.testing.assert_array_equal(BlockRunner(run / "block-1").parameters()["body.1.3.weight"],
                                  units.state_dict()["3.3.weight"].numpy())
    del units[3]
    torch.save(units.state_dict(), tmp_path / "short.pt")
    with pytest.raises(ExportError, match=r"nn.Sequential\(\*units\) does not match: missing \['3.0.weight'"):
        export_model("cnn-small", out=tmp_path / "bad", blocks=2, init_from=tmp_path / "short.pt", **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_fine_tuning_from_an_onnx_model(tmp_path: Path) -> None:
    """--init-from an ONNX model of the units (dynamo exporter, BatchNorm kept) gives the state_dict's weights and
    statistics exactly; both exporters' defaults (BatchNorm folded) and other files are refused."""
    import torch
    from torch import nn

    from edgebll.errors import ExportError
    from edgebll.export import export_model
    from edgebll.export.models import build_model
    from edgebll.runner import BlockRunner

    data = write_dataset_folder(tmp_path / "cam", {"train": _images(64, 0), "test": _images(32, 1)})
    options = dict(batch_size=32, data=data, portable=False, progress=False)
    torch.manual_seed(7)
    units = nn.Sequential(*build_model("cnn-small", input_shape=(3, 32, 32), num_classes=4).units).eval()
    for module in units.modules():  # statistics that differ from a fresh layer's
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in units.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(units, (x,), str(tmp_path / "units.onnx"), dynamo=True, optimize=False)
    run = export_model("cnn-small", out=tmp_path / "run", blocks=2, init_from=tmp_path / "units.onnx", **options)
    params = [BlockRunner(run / f"block-{k}").parameters() for k in (0, 1)]
    for key in state:
        if not key.endswith("num_batches_tracked"):
            block = int(key[0]) // 2  # cnn-small's MAC-balanced split: units 0-1 | 2-3
            np.testing.assert_array_equal(params[block][f"body.{int(key[0]) - 2 * block}{key[1:]}"], state[key].numpy())
    assert json.loads((run / "run.json").read_text())["init_from"]["kind"] == "onnx"
    defaults = {"dynamo": (dict(dynamo=True), r"its BatchNorm layers are folded into the convolutions "
                                              r"\('0.1.weight' and 31 more are missing\)"),
                "torchscript": (dict(dynamo=False), r"none of its 16 initializers is named like a weight of "
                                                    r"nn.Sequential\(\*units\) \(e.g. '0.0.weight'\)")}
    for name, (how, why) in defaults.items():
        torch.onnx.export(units, (x,), str(tmp_path / f"{name}.onnx"), **how)
        with pytest.raises(ExportError, match=rf"{name}.onnx: {why}; hint: .*optimize=False"):
            export_model("cnn-small", out=tmp_path / "bad", blocks=2, init_from=tmp_path / f"{name}.onnx", **options)
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match=r"model.onnx: not a readable ONNX model"):
        export_model("cnn-small", out=tmp_path / "bad", blocks=2, init_from=tmp_path / "model.onnx", **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_frozen_blocks_keep_their_weights_in_process_and_over_mpi(tmp_path: Path) -> None:
    import shutil

    from edgebll.export import export_model
    from edgebll.runner import BlockRunner
    from tests.test_worker import edgebll

    data = write_dataset_folder(tmp_path / "cam", {"train": _images(256, 0), "test": _images(32, 1)})
    run = export_model("cnn-small", out=tmp_path / "run", blocks=2, batch_size=16, data=data, portable=False,
                       progress=False)
    exported = BlockRunner(run / "block-0").parameters()
    runs = {name: Path(shutil.copytree(run, tmp_path / name)) for name in ("inprocess", "mpi")}
    options = ["--limit", "128", "--threads", "1", "--no-progress", "--freeze-blocks", "0"]
    assert edgebll("train", str(runs["inprocess"]), *options).returncode == 0
    done = edgebll("train", str(runs["mpi"]), "--transport", "mpi", "-n", "2", *options)
    assert done.returncode == 0, done.stdout + done.stderr
    for folder in runs.values():
        frozen = BlockRunner(folder / "block-0").parameters()
        assert all(np.array_equal(frozen[k], exported[k]) for k in exported)  # byte for byte, BatchNorm included
        top = BlockRunner(folder / "block-1").parameters()
        assert any(not np.array_equal(top[k], BlockRunner(run / "block-1").parameters()[k]) for k in top)
    from tests.test_worker import assert_same_weights

    assert_same_weights(runs["inprocess"], runs["mpi"], blocks=2)
    # resume after a frozen epoch: every block is at the same step
    assert edgebll("train", str(runs["inprocess"]), *options, "--epochs", "2", "--resume").returncode == 0
    done = edgebll("train", str(runs["inprocess"]), "--freeze-blocks", "0,1", "--no-progress")
    assert done.returncode == 2 and "freezes all 2 blocks: nothing would train" in done.stderr


def test_a_model_that_is_not_a_list_of_units_gets_told_how_to_split_it() -> None:
    from torch import nn

    from edgebll.errors import ExportError
    from edgebll.export.models import build_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.classifier = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.classifier(self.features(x).mean((2, 3)))

    with pytest.raises(ExportError, match=r"a Net is one module with its own forward\(\), not a list of units.*"
                                          r"\[model.features, \.\.\.\]"):
        build_model(Net())
    assert len(build_model(nn.ModuleList([nn.Conv2d(1, 4, 3), nn.ReLU()])).units) == 2


def test_the_shifted_fine_tuning_dataset_keeps_ten_classes_and_shifts_the_pixels(tmp_path: Path) -> None:
    """tools/shifted_fashion.py: five classes of Fashion-MNIST under a camera gamma, low contrast and noise."""
    import sys

    from conftest import require_real_data

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from shifted_fashion import make

    from edgebll.idx import read_idx

    data_dir = require_real_data()
    out = make(tmp_path / "low-light", train=64, test=32, data_dir=data_dir)
    info = read_dataset_info(out)
    assert info.num_classes == 10 and info.counts == {"train": 64, "test": 32}
    train = load_dataset_folder(out, "train")
    x, y = np.asarray(train.raw), np.asarray(train.labels)
    assert x.dtype == np.uint8 and x.shape == (64, 1, 28, 28) and set(np.unique(y)) <= {0, 1, 2, 3, 4}
    originals = read_idx(next(data_dir.glob("train-images-idx3-ubyte*")))
    first = originals[np.flatnonzero(read_idx(next(data_dir.glob("train-labels-idx1-ubyte*"))) < 5)[0]]
    assert abs(float(x[0, 0].astype(float).mean()) - (0.6 * 255 * np.mean((first / 255) ** 0.5) + 40)) < 3
    assert make(tmp_path / "again", train=64, test=32, data_dir=data_dir) and np.array_equal(
        np.asarray(load_dataset_folder(tmp_path / "again", "train").raw), x)  # seeded: the same noise


def test_token_ids_train_through_the_cli_on_a_model_of_ones_own(tmp_path: Path) -> None:
    """(10,) int64 token ids: `edgebll data import`, an export of the user's embedding units, `edgebll train` and
    `edgebll eval` from the command line, and over MPI to the same weights; the classes (the first token mod 4)
    are learnt well above chance."""
    import shutil

    from torch import nn

    from edgebll.export import export_model
    from tests.test_worker import assert_same_weights, edgebll

    rng = np.random.default_rng(0)
    for split, n in (("train", 512), ("test", 128)):
        x = rng.integers(0, 50, (n, 10))
        np.savez(tmp_path / f"{split}.npz", x=x, y=(x[:, 0] % 4).astype(np.int64))
    folder = tmp_path / "tokens"
    assert main(["data", "import", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
                 "--out", str(folder)]) == 0
    units = [nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(160, 32), nn.ReLU()),
             nn.Sequential(nn.Linear(32, 32), nn.ReLU())]
    run = export_model(units, out=tmp_path / "run", blocks=2, batch_size=32, data=folder, lr=0.01, progress=False)
    over_mpi = Path(shutil.copytree(run, tmp_path / "mpi"))
    assert main(["train", str(run), "--epochs", "3", "--threads", "1", "--no-progress"]) == 0
    assert main(["eval", str(run), "--no-progress"]) == 0
    done = edgebll("train", str(over_mpi), "--transport", "mpi", "-n", "2", "--epochs", "3", "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(run, over_mpi, blocks=2)  # rank 0 read the token folder; the same weights
    train = json.loads((run / "train.json").read_text())["epochs"][-1]
    evaluation = json.loads((run / "eval.json").read_text())
    assert train["samples"] == 512 and train["accuracy"][-1] > 0.6 and evaluation["samples"] == 128
    assert evaluation["test_accuracy"] > 0.35  # chance: 0.25
