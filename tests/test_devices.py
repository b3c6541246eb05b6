"""Device profiles (edgebll.devices.profiles): the shipped TOML files, the loader's checks, sizes, the CLI."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from edgebll.devices.profiles import (
    DeviceProfile,
    custom_profile,
    format_bytes,
    list_profiles,
    load_profile,
    parse_size,
)

from edgebll.cli import main
from edgebll.errors import DeviceError, EdgeBLLError

BOARDS = {"rpi-zero-2w", "rpi4-2gb", "rpi4-4gb", "rpi4-8gb", "rpi5-4gb", "rpi5-8gb", "jetson-nano-4gb",
          "jetson-orin-nano-8gb"}

GOOD = """\
name = "my-board"
title = "My board"
arch = "aarch64"
cpu = "4x Cortex-A53"
cores = 4
ram_bytes = 1_073_741_824
budget_bytes = 805_306_368
budget_note = "1 GiB minus the OS"
wifi_bytes_per_s = 5_000_000
"""


def _write(tmp_path: Path, text: str, name: str = "my-board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_board_ships_and_loads_through_the_package() -> None:
    shipped = {entry.name for entry in resources.files("edgebll.devices").joinpath("boards").iterdir()}
    assert shipped == {f"{name}.toml" for name in BOARDS}
    profiles = list_profiles()
    assert {p.name for p in profiles} == BOARDS
    budgets = [p.budget_bytes for p in profiles]
    assert budgets == sorted(budgets)
    for p in profiles:
        assert 0 < p.budget_bytes < p.ram_bytes, p.name
        assert p.arch == "aarch64" and p.cores >= 4 and p.link is not None
        assert "MiB" in p.budget_note and p.notes, f"{p.name}: say how the budget was chosen"
    assert load_profile("rpi-zero-2w").ram_bytes == 512 * 2**20
    assert load_profile("rpi-zero-2w").link == ("wifi", 4_000_000)  # no Ethernet port
    assert load_profile("jetson-orin-nano-8gb").cores == 6
    assert load_profile("rpi4-4gb").link[0] == "ethernet"


def test_a_profile_file_by_path(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, GOOD))
    assert profile == DeviceProfile(name="my-board", title="My board", arch="aarch64", cpu="4x Cortex-A53", cores=4,
                                    ram_bytes=2**30, budget_bytes=768 * 2**20, budget_note="1 GiB minus the OS",
                                    wifi_bytes_per_s=5_000_000)
    assert profile.link == ("wifi", 5_000_000) and profile.ethernet_bytes_per_s is None
    with pytest.raises(AttributeError):
        profile.cores = 8  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(("change", "message"), [
    (GOOD + 'colour = "red"\n', r"unknown key\(s\) \['colour'\]"),
    (GOOD.replace("cores = 4", 'cores = "4"'), "cores must be int, got str"),
    (GOOD.replace("cores = 4", "cores = true"), "cores must be int, got bool"),
    (GOOD.replace("cores = 4", "cores = 4.0"), "cores must be int, got float"),
    (GOOD.replace('title = "My board"\n', ""), r"missing key\(s\) \['title'\]"),
    (GOOD.replace("805_306_368", "2_147_483_648"), "budget_bytes .* is more than ram_bytes"),
    (GOOD.replace("cores = 4", "cores = 0"), "cores must be positive"),
    (GOOD.replace('"my-board"', '"other-board"'), "differs from the file name"),
    (GOOD + "notes = [1]\n", "notes must be str, got list"),
    (GOOD + "idle_runtime_bytes = 0\n", "idle_runtime_bytes must be positive and below budget_bytes"),
    (GOOD + "idle_runtime_bytes = 805_306_368\n", "idle_runtime_bytes must be positive and below budget_bytes"),
    ("name = \n", "not valid TOML"),
])
def test_bad_profiles_are_refused_with_the_file_and_key_named(tmp_path: Path, change: str, message: str) -> None:
    path = _write(tmp_path, change)
    with pytest.raises(DeviceError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value) or "device profile" in str(info.value)
    assert isinstance(info.value, EdgeBLLError)


def test_a_boards_own_idle_runtime_is_reserved_before_any_block() -> None:
    """A block may use the budget less the idle runtime: the board's own where its file gives it."""
    from edgebll.devices.profiles import DEFAULT_IDLE_RUNTIME_BYTES
    from edgebll.export.fit import block_allowance_bytes

    measured = custom_profile("300MiB", idle_runtime="45MiB")
    assert measured.idle_bytes == 45 * 2**20
    assert block_allowance_bytes(measured) == 255 * 2**20
    assert block_allowance_bytes(custom_profile("300MiB")) == 300 * 2**20 - DEFAULT_IDLE_RUNTIME_BYTES


def test_unknown_names_and_missing_files() -> None:
    with pytest.raises(DeviceError, match="unknown device 'rpi9'.*rpi4-4gb"):
        load_profile("rpi9")
    with pytest.raises(DeviceError, match="no such device profile file"):
        load_profile("/nonexistent/board.toml")


@pytest.mark.parametrize(("text", "expected"), [
    ("300MB", 300_000_000), ("1.5GiB", 3 * 2**29), (" 512 MiB ", 512 * 2**20), ("4096", 4096), ("2kb", 2000),
    ("0.5KiB", 512), ("1TB", 10**12), (12345, 12345), ("1.7B", 1), (".5MiB", 2**19),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12XB", "1.2.3MB", "-1MB", "MB", "", "1 M B", -5, True, 1.5, None])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(DeviceError):
        parse_size(bad)  # type: ignore[arg-type]


def test_custom_profile() -> None:
    profile = custom_profile()
    assert profile.budget_bytes == profile.ram_bytes == 300_000_000 and profile.cores == 2
    bigger = custom_profile("1GiB", 4, ram="2GiB", arch="aarch64", name="lab-pi")
    assert (bigger.name, bigger.budget_bytes, bigger.ram_bytes, bigger.arch) == ("lab-pi", 2**30, 2**31, "aarch64")
    with pytest.raises(DeviceError, match="more than ram_bytes"):
        custom_profile("2GiB", ram="1GiB")
    with pytest.raises(DeviceError, match="cores"):
        custom_profile("1GiB", cores="4")  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert format_bytes(812) == "812 B"
    assert format_bytes(300 * 2**20) == "300.0 MiB"
    assert format_bytes(3.375 * 2**30) == "3.38 GiB"


def test_devices_command_lists_every_board(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split()[:5] == ["name", "RAM", "budget", "cores", "arch"]
    assert {row.split()[0] for row in rows} == BOARDS
    assert "wifi 32 Mbit/s" in next(r for r in rows if r.startswith("rpi-zero-2w"))
    assert main(["devices", "--json"]) == 0
    assert '"budget_bytes": 314572800' in capsys.readouterr().out
