"""Models, partition and export options (host side)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgebll.errors import ExportError
from edgebll.devices.profiles import DeviceProfile
from edgebll.export import build_blocks, build_model, export_model
from edgebll.export.models import conv_bn_relu
from edgebll.export.partition import balanced_split, unit_costs


def test_zoo_models_have_the_documented_size() -> None:
    small = build_model("cnn-small")
    resnet = build_model("resnet18")
    count = lambda spec: sum(p.numel() for u in spec.units for p in u.parameters())  # noqa: E731
    assert 0.5e6 <= count(small) <= 2e6
    assert 11.0e6 <= count(resnet) <= 11.3e6  # ResNet-18 without its classifier
    assert len(small.units) == 4 and len(resnet.units) == 9
    vgg = build_model("vgg8b")
    assert 7.2e6 <= count(vgg) + 1024 * 10 + 10 <= 7.4e6  # the paper's 7.3 M with the classifier (the last head)
    assert len(vgg.units) == 7  # one unit per layer: --blocks 7 trains every layer on its own


@pytest.mark.parametrize("name", ["cnn-small", "resnet18", "vgg8b"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_blocks_chain_and_reproduce_the_model(name: str, k: int) -> None:
    """Blocks cover every unit once, in order, and chained they compute the unpartitioned model."""
    torch.manual_seed(0)
    spec = build_model(name)
    blocks, shapes, groups = build_blocks(spec, "bwbpf", k)
    assert [u for g in groups for u in g] == list(range(len(spec.units)))
    assert shapes[0] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    labels = torch.zeros(2, dtype=torch.int64)
    whole = nn.Sequential(*spec.units).eval()
    h = x
    for b, block in enumerate(blocks):
        block.eval()
        assert tuple(h.shape[1:]) == shapes[b]
        out = block(h, labels)
        assert out[1].shape == (2, 10)
        if b < k - 1:
            h = out[2]
    with torch.no_grad():
        torch.testing.assert_close(blocks[-1].body(h), whole(x))


def test_balanced_split_minimises_the_largest_block() -> None:
    assert balanced_split([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_split([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0, 1, 9]
    assert balanced_split([1, 2, 3, 4, 5], 3) == [0, 3, 4, 5]
    assert balanced_split([5, 5], 1) == [0, 2]


def test_unit_costs_count_conv_macs() -> None:
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    macs, shapes = unit_costs([conv, nn.Conv2d(4, 2, 1, stride=2)], (1, 8, 8))
    assert macs == [4 * 8 * 8 * 9, 2 * 4 * 4 * 4]
    assert shapes == [(4, 8, 8), (2, 4, 4)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=5), r"cannot split a model of 4 units into 5 blocks; choose --blocks between 1 and 4"),
    (dict(blocks=0), r"choose --blocks between 1 and 4"),
    (dict(method="bp", blocks=2), r"--method bp trains the whole model end to end as one block.*--blocks 1"),
    (dict(method="magic"), r"unknown method 'magic'"),
    (dict(head="attention"), r"unknown head 'attention'"),
    (dict(batch_size=1), r"--batch-size must be at least 2"),
    (dict(optimizer="lion"), r"unknown optimizer 'lion'; choose adamw or sgd"),
])
def test_bad_export_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_model("cnn-small", out=tmp_path / "r", progress=False, **kwargs, portable=False)


def test_unknown_model_and_bad_custom_units(tmp_path: Path) -> None:
    with pytest.raises(ExportError,
                       match=r"unknown model 'vgg99'; choose one of \['cnn-small', 'resnet18', 'transformer', 'vgg8b'\]"):
        export_model("vgg99", out=tmp_path / "r", progress=False, portable=False)
    with pytest.raises(ExportError, match=r"custom model: item 1 is a str, not an nn.Module"):
        export_model([nn.ReLU(), "conv"], out=tmp_path / "r", blocks=1, progress=False, portable=False)


def test_existing_output_is_not_overwritten_silently(tiny_run: Path) -> None:
    with pytest.raises(ExportError, match=r"already exists and is not empty; hint: .*--overwrite"):
        export_model("cnn-small", out=tiny_run, progress=False, portable=False)


def test_bp_is_one_block_with_the_classifier(tmp_path: Path) -> None:
    from edgebll.manifest import load_block_manifest

    torch.manual_seed(0)
    units = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.ReLU())]
    run = export_model(units, out=tmp_path / "bp", method="bp", blocks=1, progress=False, portable=False)
    m = load_block_manifest(run / "block-0")
    assert (m.method, m.num_blocks, m.units, m.output("message")) == ("bp", 1, ["unit0", "unit1"], None)


def test_heads_follow_the_activation() -> None:
    from edgebll.export.heads import ConvHead, LinearHead, make_head

    assert isinstance(make_head("conv", (32, 28, 28), 10), ConvHead)
    assert isinstance(make_head("conv", (64,), 10), LinearHead)  # an MLP block has no spatial axes
    assert isinstance(make_head("linear", (32, 28, 28), 10), LinearHead)
    spec = build_model("cnn-small")
    blocks, _, _ = build_blocks(spec, "bwbpf", 4, head="conv")
    assert [type(b.head).__name__ for b in blocks] == ["ConvHead", "ConvHead", "ConvHead", "LinearHead"]


def test_bll_losses_stay_finite_for_saturated_logits() -> None:
    """softplus and the Bernoulli KL are written without Log(Sigmoid): no inf/NaN, also in their gradients."""
    from edgebll.export.local_block import bernoulli_kl, softplus

    z = torch.tensor([-1000.0, -90.0, -1.0, 0.0, 1.0, 90.0, 1000.0], requires_grad=True)
    torch.testing.assert_close(softplus(z), torch.nn.functional.softplus(z))
    softplus(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.sigmoid(z.detach()))
    p, q = torch.tensor([[200.0, -200.0, 3.0]]), torch.tensor([[-200.0, 200.0, 3.0]])
    kl = bernoulli_kl(p, q)
    assert torch.isfinite(kl) and kl.item() == pytest.approx(400.0, rel=1e-4)  # -log sigmoid(-200) = 200 per saturated unit


def test_fit_check_against_a_board(run_copy: Path) -> None:
    from edgebll.devices.profiles import custom_profile
    from edgebll.devices.profiles import DEFAULT_IDLE_RUNTIME_BYTES as IDLE_RUNTIME_BYTES
    from edgebll.export.fit import assign_devices, check_fit, refuse_misfits
    from edgebll.manifest import load_block_manifest

    fits = check_fit(run_copy, custom_profile("2GB"))
    assert [f.fits for f in fits] == [True] * 3
    assert load_block_manifest(run_copy / "block-1").device["budget_bytes"] == 2 * 10**9  # the board is recorded
    assert fits[0].estimated_bytes == load_block_manifest(run_copy / "block-0").estimated_peak_bytes
    tight = fits[0].estimated_bytes + IDLE_RUNTIME_BYTES - 1  # one byte short for block 0
    misfits = check_fit(run_copy, custom_profile(tight))
    assert not misfits[0].fits
    with pytest.raises(ExportError, match=r"block 0 needs about .* but custom allows .* \(short by 1 B\); "
                                          r"hint: more --blocks, a smaller --batch-size than 16"):
        refuse_misfits(misfits, 16)
    with pytest.raises(ExportError, match=r"--device lists 2 boards for 3 blocks"):
        assign_devices([custom_profile("1GB"), custom_profile("2GB")], 3)


def test_export_cli_refuses_a_board_too_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgebll.cli import main

    out = tmp_path / "run"
    code = main(["export", "--model", "cnn-small", "--out", str(out), "--no-progress", "--no-portable", "--budget", "60MB"])
    captured = capsys.readouterr()
    assert code == 2 and "NO" in captured.out
    assert "ExportError: block 0 needs about" in captured.err and not out.exists()  # nothing half-usable is left
    assert main(["export", "--model", "cnn-small", "--out", str(out), "--no-progress", "--no-portable", "--budget", "2GB"]) == 0
    assert capsys.readouterr().out.count(" yes") == 4
    # a Pi trains on the portable graphs: a run without them cannot be placed on one
    assert main(["export", "--model", "cnn-small", "--out", str(tmp_path / "pi"), "--no-progress", "--no-portable",
                 "--device", "rpi4-2gb"]) == 2
    assert ("rpi4-2gb (aarch64) train with the portable backend (onnxruntime-training has no wheel for their CPU), "
            "which --no-portable leaves out; hint: drop --no-portable") in capsys.readouterr().err
    assert not (tmp_path / "pi").exists()


def test_fit_check_reads_the_estimate_of_the_backend_the_board_trains_with(tiny_portable_run: Path,
                                                                          tmp_path: Path) -> None:
    """An aarch64 board trains on the portable graphs (no onnxruntime-training wheel exists for it), so its
    fit is the portable step's estimate, which the manifest carries; an x86-64 board's is the training build's."""
    import shutil

    from edgebll.devices.profiles import custom_profile
    from edgebll.export.fit import check_fit
    from edgebll.manifest import load_block_manifest
    from edgebll.memory import estimate_peak_bytes

    run = Path(shutil.copytree(tiny_portable_run, tmp_path / "run"))
    manifests = [load_block_manifest(run / f"block-{k}") for k in range(2)]
    portable = [int(estimate_peak_bytes(run / f"block-{k}", backend="portable").total) for k in range(2)]
    assert [m.portable.estimated_peak_bytes for m in manifests] == portable  # written at export
    assert portable != [m.estimated_peak_bytes for m in manifests]
    pi = custom_profile("2GB", arch="aarch64", name="pi")
    assert [f.estimated_bytes for f in check_fit(run, pi)] == portable
    pc = custom_profile("2GB", arch="x86_64", name="pc")
    assert [f.estimated_bytes for f in check_fit(run, pc)] == [m.estimated_peak_bytes for m in manifests]


def test_export_cli_auto_says_which_board_takes_each_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgebll.cli import main

    out = tmp_path / "run"
    assert main(["export", "--model", "cnn-small", "--blocks", "auto", "--device", "rpi-zero-2w,rpi4-2gb", "--out",
                 str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exported 1 block(s) of cnn-small (bwbpf)" in printed and "1 unit ranges estimated" in printed
    assert "stage0..stage3" in printed and "rpi-zero-2w (#1)" in printed and "unused boards: rpi4-2gb (#2)" in printed


def test_blocks_auto_picks_the_fewest_blocks_that_fit(tmp_path: Path) -> None:
    """Real exports of a tiny model: the search's range estimates are the manifests', the split is the fewest
    blocks that fit, and a listed board that fits goes first (the no-fit errors: the test below)."""
    from edgebll.devices.profiles import custom_profile
    from edgebll.devices.profiles import DEFAULT_IDLE_RUNTIME_BYTES as IDLE_RUNTIME_BYTES
    from edgebll.export.fit import export_to_fit
    from edgebll.export.range_memory import RangeMemory
    from edgebll.run_folder import load_run_config

    def units() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(*conv_bn_relu(1, 8)), nn.Sequential(*conv_bn_relu(8, 8)),
                nn.Sequential(*conv_bn_relu(8, 16, stride=2))]

    def board(allowance: int, name: str = "custom") -> DeviceProfile:
        return custom_profile(IDLE_RUNTIME_BYTES + allowance, name=name)

    roomy = custom_profile("4GB")
    chosen = export_to_fit(units(), out=tmp_path / "one", devices=roomy, batch_size=16, progress=False)
    assert chosen.split.bounds == (0, 3) and chosen.ranges_estimated == 1  # one block fits: nothing else is exported
    alone = RangeMemory(spec=build_model(units()), batch_size=16)
    single = [alone(u, u + 1) for u in range(3)]  # each unit as the block it would be
    chosen = export_to_fit(units(), out=tmp_path / "tight", devices=board(max(single)), batch_size=16, progress=False)
    assert 1 < chosen.split.num_blocks <= 3 and all(f.fits for f in chosen.fits) and chosen.run_dir.is_dir()
    assert chosen.searched_bytes == [f.estimated_bytes for f in chosen.fits]  # the search saw the manifests' numbers
    assert load_run_config(chosen.run_dir).partition["bounds"] == list(chosen.split.bounds)
    assert not (tmp_path / ".tight.fitting").exists()
    # listed small board first: one block on the roomy second board beats two blocks
    chosen = export_to_fit(units(), out=tmp_path / "mixed", devices=[board(min(single), "small"), roomy],
                           batch_size=16, progress=False)
    assert chosen.split.boards == (1,) and chosen.fits[0].device == roomy and chosen.unused_boards() == [0]


def test_blocks_auto_for_an_aarch64_board_fits_the_portable_estimates(tmp_path: Path) -> None:
    """The search runs on the training graphs' estimates; a board that trains on the portable graphs is checked
    against those, and a split that does not fit by them is searched again with the estimates scaled up."""
    import json

    from edgebll.devices.profiles import DEFAULT_IDLE_RUNTIME_BYTES as IDLE_RUNTIME_BYTES
    from edgebll.devices.profiles import custom_profile
    from edgebll.export.fit import export_to_fit
    from edgebll.export.range_memory import RangeMemory
    from edgebll.manifest import load_block_manifest
    from edgebll.run_folder import load_run_config

    def units() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(*conv_bn_relu(1, 8)), nn.Sequential(*conv_bn_relu(8, 8)),
                nn.Sequential(*conv_bn_relu(8, 16, stride=2))]

    whole = export_to_fit(units(), out=tmp_path / "roomy", devices=custom_profile("4GB", arch="aarch64"),
                          batch_size=16, progress=False)
    assert whole.split.num_blocks == 1 and whole.attempts == 1
    portable = load_block_manifest(whole.run_dir / "block-0").portable.estimated_peak_bytes
    training = RangeMemory(spec=build_model(units()), batch_size=16)(0, 3)
    assert whole.fits[0].estimated_bytes == portable > training  # the board's estimate is the portable step's
    between = custom_profile(IDLE_RUNTIME_BYTES + portable - 1, arch="aarch64", name="pi")  # one block fits by training
    chosen = export_to_fit(units(), out=tmp_path / "tight", devices=between, batch_size=16, progress=False)
    assert chosen.attempts == 2 and chosen.estimate_scale >= portable / training  # one block fitted only by training
    assert chosen.split.num_blocks > 1 and all(f.fits for f in chosen.fits)
    for k, f in enumerate(chosen.fits):
        assert f.estimated_bytes == load_block_manifest(chosen.run_dir / f"block-{k}").portable.estimated_peak_bytes
    partition = load_run_config(chosen.run_dir).partition
    assert partition["attempts"] == 2 and json.dumps(partition)


def test_no_split_message_names_the_unit_or_the_missing_boards() -> None:
    from edgebll.devices.profiles import custom_profile
    from edgebll.devices.profiles import DEFAULT_IDLE_RUNTIME_BYTES as IDLE_RUNTIME_BYTES
    from edgebll.export.fit import _no_split_message

    boards = [custom_profile(IDLE_RUNTIME_BYTES + 100, name="a"), custom_profile(IDLE_RUNTIME_BYTES + 60, name="b")]
    names = ["u0", "u1", "u2"]
    memory = {(0, 1): 50, (1, 2): 130, (2, 3): 50, (0, 2): 200, (1, 3): 200, (0, 3): 300}
    message = _no_split_message(names, lambda lo, hi: memory[lo, hi], boards, [100, 60], "bwbpf")
    assert "unit 'u1' alone needs about 130 B, a allows 100 B (short by 30 B)" in message and "u0" not in message
    memory[1, 2] = 90  # every unit fits the big board alone; two boards are too few for three blocks
    message = _no_split_message(names, lambda lo, hi: memory[lo, hi], boards, [100, 60], "bwbpf")
    assert message.startswith("no assignment of the 2 boards listed fits the model: on boards like a it takes 3 "
                              "blocks; hint: list more boards")


def test_blocks_auto_with_predsim_starts_at_two_blocks_and_counts_its_heads(tmp_path: Path) -> None:
    """Pred-Sim needs a block below the classifier: a roomy board still gets 2 blocks, the lower a PredSimBlock,
    and the range costs include its prediction and similarity heads (which the cap of bwbpf heads does not limit)."""
    from edgebll.devices.profiles import custom_profile
    from edgebll.export.exporter import local_loss_modules
    from edgebll.export.fit import export_to_fit
    from edgebll.export.partition import range_costs
    from edgebll.export.predsim import PredSimConfig
    from edgebll.run_folder import load_run_config

    def units() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(*conv_bn_relu(1, 8)), nn.Sequential(*conv_bn_relu(8, 8)),
                nn.Sequential(*conv_bn_relu(8, 16, stride=2))]

    chosen = export_to_fit(units(), out=tmp_path / "p", devices=custom_profile("4GB"), method="predsim",
                           batch_size=16, progress=False, predsim=PredSimConfig(beta=0.5))
    assert chosen.split.num_blocks == 2 and all(f.fits for f in chosen.fits)
    config = load_run_config(chosen.run_dir)
    assert config.method == "predsim" and config.predsim["beta"] == 0.5
    spec = build_model(units())
    macs, shapes = unit_costs(spec.units, spec.input_shape)
    costs = range_costs(spec.units, spec.input_shape,
                        lambda lo, hi: local_loss_modules(spec, "predsim", "conv", lo, hi, macs, shapes))
    # units 0..1 as a Pred-Sim block: its 3x3 similarity conv (8 -> 8 channels on 28x28) alone costs 451,584 MACs
    assert costs[0][2] >= macs[0] + macs[1] + 8 * 8 * 9 * 28 * 28


def test_predsim_refuses_per_token_labels(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--method predsim compares the labels of whole samples; transformer"):
        export_model("transformer", out=tmp_path / "t", method="predsim", blocks=2, progress=False, portable=False)
