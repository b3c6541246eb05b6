"""Train on an emulated aarch64 board what the host trains, and check every step agrees.

No board needed: an arm64 Debian userland (Python 3.11) runs under qemu-user, with this checkout's
board wheel (``make wheel-aarch64``: the codec cross-compiled for aarch64) and the aarch64 wheels
of numpy and onnxruntime that ``pip install`` of it brings on a Pi. For cnn-small bwbpf (2 blocks) and BLL (2 forward + 1 feedback block),
exported here with their portable graphs (SGD, fp32 messages), on Fashion-MNIST batches:

1. the host trains from the command line (``edgebll train --backend portable``), recording every
   block step (benchmarks/board_steps.py), and evaluates;
2. the board replays each recorded step alone, from the host's state before it with the host's
   inputs: every output and every next-state tensor must agree within 1e-4 (the parity tests' rule);
3. the board evaluates the host's trained weights: eval.json must agree;
4. the board trains and evaluates its own run from the command line, like a user; how far its
   weights end from the host's is reported beside how far the host's own run moves when every
   block input gets 1e-6 of noise. Not a pass criterion: the two machines sum in different orders,
   and a ReLU input within rounding of zero flips its gradient on one and not the other, which the
   later steps carry on (measured: the host's own 1e-6 noise moves the weights 5e-3 in 8 steps).

    python benchmarks/emulated_board.py            # what `make test-aarch64` runs

Needs root and Debian's debootstrap, qemu-user-static, gcc-aarch64-linux-gnu and
libc6-dev-arm64-cross (`make test-aarch64` installs them). The userland is cached outside the
checkout (``$EDGEBLL_ARM64_ROOT``, default ``~/.cache/edgebll/arm64-bookworm``): the first run
downloads it (about a minute, from the Debian mirror this machine's apt uses) and unpacks its
packages without configuring them (python needs no more). The board's commands run in a chroot
of it through binfmt_misc, registered here from qemu-user-static's own entry: under plain
``qemu-aarch64 -L`` the board would read this machine's /proc/cpuinfo and /sys, and onnxruntime's
CPU detection crashes on an x86 description.
Writes benchmarks/results/emulated_board.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from board_steps import TOLERANCE, gap_summary
from board_steps import compare as compare_steps
from common import describe_machine, machine_info, markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"  # Debian 12: Python 3.11, the CPython of onnxruntime's newest aarch64 wheels
BOARD_PACKAGES = ("numpy", "onnxruntime==1.32.0", "tqdm")  # the host's .venv-board has the same onnxruntime
# The check is of the training arithmetic, so nothing may turn a rounding difference into a step:
# - fp32 messages: with int8, a difference in block 0's output that crosses a quantization boundary
#   moves block 1's input by a whole step;
# - SGD: AdamW divides each gradient by its running RMS, so parameters whose gradient is rounding
#   noise (a bias before BatchNorm) take full steps of size lr in the noise's direction.
CODEC = "fp32"
OPTIMIZER = "sgd"
NOISE = 1e-6  # the host's own sensitivity: every block input perturbed by N(0, NOISE)
FLIP_SHARE, FLIP_CAP = 0.005, 1e-3
# The emulated core: a Raspberry Pi 5's. qemu's default ("max") offers SVE, whose emulation made
# onnxruntime's steps 5-9x slower still; a Cortex-A76 has NEON only, like the boards users have.
BOARD_CPU = os.environ.get("EDGEBLL_QEMU_CPU", "cortex-a76")
TOOLS = {"debootstrap": "debootstrap", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
         "dpkg-deb": "dpkg", "qemu-aarch64-static": "qemu-user-static"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # qemu-user-static's registration line
BOARD_PATH = ["/opt/edgebll", "/opt/edgebll-site"]  # PYTHONPATH inside the chroot
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``URIs:`` or a one-line ``deb`` entry for debian)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = match.group(1)
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise SystemExit("no Debian mirror in /etc/apt/sources.list*: set one up for apt first")


def check_tools() -> None:
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing tools; apt-get install -y {' '.join(missing)} libc6-dev-arm64-cross")
    if os.geteuid() != 0:
        raise SystemExit("debootstrap, binfmt_misc and chroot need root; run it as root (or with sudo)")


def register_binfmt() -> None:
    """Let the kernel run aarch64 binaries through qemu-aarch64-static (idempotent)."""
    if (BINFMT / "qemu-aarch64").exists():
        return
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not BINFMT_ENTRY.is_file():
        raise SystemExit(f"{BINFMT_ENTRY} missing; apt-get install -y qemu-user-static")
    (BINFMT / "register").write_text(BINFMT_ENTRY.read_text().strip())


def userland(root: Path) -> Path:
    """An arm64 Debian with python3 unpacked under ``root`` (made once; returns its python)."""
    python = root / "usr" / "bin" / "python3"
    if (root / ".edgebll-ready").is_file():
        return python
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    # --foreign downloads and unpacks without running arm64 code; the rest is unpacking the debs it fetched
    subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", "--foreign", "--include=python3",
                    SUITE, str(root), apt_mirror()], check=True, stdout=subprocess.DEVNULL)
    for deb in sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not python.exists():
        raise SystemExit(f"{python} missing after unpacking the userland")
    (root / ".edgebll-ready").write_text("ok\n")
    return python


def board_site(root: Path) -> Path:
    """numpy, onnxruntime and tqdm for aarch64 CPython 3.11, installed by the host's pip into a folder."""
    site = root / "opt" / "edgebll-site"
    marker = site / ".installed"
    if marker.is_file() and marker.read_text() == " ".join(BOARD_PACKAGES):
        return site
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--only-binary=:all:",
                    "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
                    "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
                    *BOARD_PACKAGES], check=True)
    marker.write_text(" ".join(BOARD_PACKAGES))
    return site


def board_package(root: Path) -> Path:
    """This checkout's board wheel (``make wheel-aarch64``), installed by the host's pip for aarch64 CPython 3.11
    as a board's pip installs it (its dependencies come from :func:`board_site`)."""
    spec = importlib.util.spec_from_file_location("board_wheel", REPO / "tools" / "board_wheel.py")
    board_wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board_wheel)
    top = root / "opt" / "edgebll"
    shutil.rmtree(top, ignore_errors=True)
    with tempfile.TemporaryDirectory() as dist:
        wheel = board_wheel.build(Path(dist))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(top),
                        "--only-binary=:all:", "--platform", board_wheel.TAG, "--python-version", "3.11",
                        "--implementation", "cp", str(wheel)], check=True)
    shutil.copyfile(Path(__file__).with_name("board_steps.py"), top / "board_steps.py")
    return top


def on_board(root: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """``python3 ARGS`` on the board: a chroot of ``root`` (paths in ARGS are the chroot's)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(BOARD_PATH), "PYTHONNOUSERSITE": "1",
           "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": BOARD_CPU}
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # resolved here: ``env`` has the board's PATH
    return subprocess.run([chroot, str(root), "/usr/bin/python3", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def inside(root: Path, path: Path) -> str:
    """``path`` (under ``root``) as the chroot sees it."""
    return "/" + str(path.relative_to(root))


def on_host(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=3600)


def _checked(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def drift(host_run: Path, board_run: Path) -> dict[str, dict[str, float]]:
    """Per block folder: the largest |board - host| over its trained state tensors, and the most of any
    one tensor's elements that differ by more than TOLERANCE (a share)."""
    worst = {}
    for state in sorted(host_run.glob("block-*/**/trained/portable_state.npz")):
        folder = state.parent.parent.relative_to(host_run)
        with np.load(state) as host, np.load(board_run / folder / "trained" / "portable_state.npz") as board:
            if sorted(host.files) != sorted(board.files):
                raise SystemExit(f"{folder}: board and host saved different state tensors")
            worst[str(folder)] = gap_summary([np.abs(board[k].astype(np.float64) - host[k]) for k in host.files])
    return worst


def agrees(worst: dict[str, dict[str, float]]) -> bool:
    """Every element within TOLERANCE, but for at most FLIP_SHARE of a tensor's, which stay within FLIP_CAP
    (the allowance of tests/test_portable.py: a ReLU whose input lies within rounding of 0 passes the
    gradient on one machine and blocks it on the other)."""
    return all(g["max_abs_difference"] <= FLIP_CAP and g["share_beyond_tolerance"] <= FLIP_SHARE
               for g in worst.values())


def same_eval(host: dict, board: dict) -> bool:
    """Equal accuracies (the same images right) and losses within TOLERANCE (eval.json rounds to 5 digits)."""
    return (host["per_block_accuracy"] == board["per_block_accuracy"]
            and abs(host["test_loss"] - board["test_loss"]) <= TOLERANCE)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # qemu emulates every float operation in software: a cnn-small block's step at batch 16 takes
    # about 20 s (against ~50 ms natively); the defaults keep the whole check near 20 minutes
    parser.add_argument("--limit", type=int, default=128, help="training images (default: 128, 8 steps of 16)")
    parser.add_argument("--eval-limit", type=int, default=128, help="test images to evaluate (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    parser.add_argument("--data-dir", default=os.environ.get("EDGEBLL_DATA_DIR", str(DEFAULT_DATA)))
    parser.add_argument("--root", default=os.environ.get("EDGEBLL_ARM64_ROOT",
                                                         str(Path.home() / ".cache" / "edgebll" / "arm64-bookworm")),
                        help="where the arm64 userland is cached (default: $EDGEBLL_ARM64_ROOT or "
                             "~/.cache/edgebll/arm64-bookworm)")
    parser.add_argument("--name", default="emulated_board", help="results file stem (default: emulated_board)")
    args = parser.parse_args(argv)
    check_tools()
    register_binfmt()
    began = time.perf_counter()
    root = Path(args.root).expanduser()
    userland(root)
    board_site(root)
    board_package(root)
    data = root / "data" / "fashion-mnist"  # the board reads its own copy: a chroot sees nothing else
    data.mkdir(parents=True, exist_ok=True)
    for file in Path(args.data_dir).glob("*-ubyte*"):
        if not (data / file.name).is_file():
            shutil.copyfile(file, data / file.name)
    facts = json.loads(_checked(on_board(root, "-c", (
        "import json, platform, sys, numpy, onnxruntime\n"
        "from edgebll import codec\n"
        "from edgebll.ort_training import training_available\n"
        "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
        "'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__, "
        "'native_codec': codec.native_available(), 'training_build': training_available(), "
        "'installed_at': codec.__file__.rsplit('/edgebll/codec/', 1)[0], "
        "'torch': 'torch' in sys.modules}))")), "the board's python").strip().splitlines()[-1])
    if (facts["machine"] != "aarch64" or not facts["native_codec"] or facts["training_build"]
            or facts["installed_at"] != BOARD_PATH[0]):
        raise SystemExit(f"the emulated board is not what it should be: {facts}")

    rows = []
    (root / "work").mkdir(exist_ok=True)
    # kept when a method disagrees, for a look at what parted (the host's and the board's run folders)
    tmp = Path(tempfile.mkdtemp(prefix="edgebll-board-", dir=root / "work"))
    steps_script = str(Path(__file__).with_name("board_steps.py"))
    for method in ("bwbpf", "bll"):
        run = tmp / method
        _checked(on_host("-m", "edgebll", "export", "--model", "cnn-small", "--method", method, "--blocks", "2",
                         "--batch-size", str(args.batch_size), "--optimizer", OPTIMIZER, "--out", str(run),
                         "--no-progress"), "export")

        def commands(where: str, data_dir: str) -> tuple[list[str], list[str]]:
            common = ["--backend", "portable", "--threads", "1", "--data-dir", data_dir, "--no-progress",
                      "--codec", CODEC]
            return (["train", where, "--epochs", "1", "--limit", str(args.limit), *common],
                    ["eval", where, "--limit", str(args.eval_limit), *common])

        def copy(name: str, source: Path = run) -> Path:
            return Path(shutil.copytree(source, tmp / f"{method}-{name}"))

        seconds: dict[str, float] = {}
        started = time.perf_counter()  # 1. the host trains (recording its steps) and evaluates
        host, recorded = copy("host"), tmp / f"{method}-steps"
        train, evaluate = commands(str(host), str(data))
        _checked(on_host(steps_script, "record", str(recorded), "--", *train), f"train of {method} on the host")
        _checked(on_host("-m", "edgebll", *evaluate), f"eval of {method} on the host")
        seconds["host"] = time.perf_counter() - started
        noisy = copy("host-noise")  # how far 1e-6 of noise on every block input carries the host's own run
        train, _ = commands(str(noisy), str(data))
        _checked(on_host(steps_script, "record", "--perturb", str(NOISE), str(tmp / f"{method}-noise-steps"), "--",
                         *train), f"train of {method} on the host with noise")
        shutil.rmtree(tmp / f"{method}-noise-steps")

        started = time.perf_counter()  # 2. the board replays each recorded step alone
        replayed, graphs = tmp / f"{method}-replayed", copy("replay-graphs")
        _checked(on_board(root, "/opt/edgebll/board_steps.py", "replay", inside(root, recorded),
                          inside(root, graphs), inside(root, replayed)), f"replay of {method} on the board")
        seconds["replay"] = time.perf_counter() - started
        steps = compare_steps(recorded, replayed)

        started = time.perf_counter()  # 3. the board evaluates the host's weights
        weights = copy("host-weights-on-board", host)
        _, evaluate = commands(inside(root, weights), inside(root, data))
        _checked(on_board(root, "-m", "edgebll", *evaluate), f"eval of the host's {method} weights on the board")
        seconds["eval"] = time.perf_counter() - started

        started = time.perf_counter()  # 4. the board trains and evaluates its own run
        board = copy("board")
        for command in commands(inside(root, board), inside(root, data)):
            _checked(on_board(root, "-m", "edgebll", *command), f"{command[0]} of {method} on the board")
        seconds["board"] = time.perf_counter() - started

        evals = {name: json.loads((folder / "eval.json").read_text())
                 for name, folder in (("host", host), ("weights", weights), ("board", board))}
        whole, noise = drift(host, board), drift(host, noisy)
        rows.append({
            "method": method, "steps": json.loads((board / "train.json").read_text())["steps"],
            "block_steps": sum(g["steps"] for g in steps.values()), "graphs": len(steps),
            "steps_agree": agrees(steps), "eval_agrees": same_eval(evals["host"], evals["weights"]),
            "step_max_abs_difference": max(g["max_abs_difference"] for g in steps.values()),
            "step_share_beyond_tolerance": max(g["share_beyond_tolerance"] for g in steps.values()),
            "per_graph": steps,
            "run_max_abs_difference": max(g["max_abs_difference"] for g in whole.values()),
            "host_noise_max_abs_difference": max(g["max_abs_difference"] for g in noise.values()),
            "host_accuracy": evals["host"]["per_block_accuracy"],
            "host_weights_on_board_accuracy": evals["weights"]["per_block_accuracy"],
            "board_run_accuracy": evals["board"]["per_block_accuracy"],
            "seconds": {k: round(v, 1) for k, v in seconds.items()}})
        if rows[-1]["steps_agree"]:
            shutil.rmtree(recorded)  # ~100 MB per method: every step's state, twice
    failed = [r["method"] for r in rows if not (r["steps_agree"] and r["eval_agrees"])]
    if failed:
        print(f"the runs that disagree are kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    machine = machine_info()
    settings = {"model": "cnn-small", "blocks": 2, "batch_size": args.batch_size, "limit": args.limit, "cpu": BOARD_CPU,
                "eval_limit": args.eval_limit, "tolerance": TOLERANCE, "suite": SUITE, "codec": CODEC,
                "optimizer": OPTIMIZER,
                "board_packages": list(BOARD_PACKAGES), "total_seconds": round(time.perf_counter() - began, 1)}
    def accuracy(values: list[float]) -> str:
        return " / ".join(f"{a:.4f}" for a in values)

    table = markdown_table(
        ["method", "steps", "block steps replayed", "step max abs difference", f"elements > {TOLERANCE:g}",
         "host accuracy", "host weights on board", "board's own run", "run drift", f"host drift, {NOISE:g} noise",
         "board s (replay / eval / run)"],
        [[r["method"], r["steps"], r["block_steps"], f"{r['step_max_abs_difference']:.1e}",
          f"{100 * r['step_share_beyond_tolerance']:.2f} %", accuracy(r["host_accuracy"]),
          accuracy(r["host_weights_on_board_accuracy"]), accuracy(r["board_run_accuracy"]),
          f"{r['run_max_abs_difference']:.1e}", f"{r['host_noise_max_abs_difference']:.1e}",
          f"{r['seconds']['replay']:.0f} / {r['seconds']['eval']:.0f} / {r['seconds']['board']:.0f}"] for r in rows],
        align="lrrrrlllrrr")
    markdown = (
        "# Training on an emulated aarch64 board\n\n"
        f"`python benchmarks/emulated_board.py` (`make test-aarch64`) on {describe_machine(machine)}. The board: "
        f"Debian {SUITE} arm64 under qemu-user (`-cpu {BOARD_CPU}`), {facts['machine']}, Python {facts['python']}, numpy "
        f"{facts['numpy']}, onnxruntime {facts['onnxruntime']} (no training build, no torch), edgebll from the board wheel "
        "(`make wheel-aarch64`, its codec cross-compiled for aarch64).\n\n"
        f"cnn-small in 2 blocks, batch {args.batch_size}, {args.limit} Fashion-MNIST training images (one epoch), "
        f"{OPTIMIZER.upper()}, `--backend portable`, {CODEC} messages (why both: benchmarks/emulated_board.py); "
        f"`edgebll eval --limit {args.eval_limit}`. The host trains and records every block step; the board "
        "replays each step alone, from the host's state before it with the host's inputs. \"step max abs "
        "difference\": the largest |board − host| over every output and next-state tensor (weights, BatchNorm "
        f"statistics, loss, logits, message) of every replayed step; \"elements > {TOLERANCE:g}\": the largest "
        f"share of one tensor's elements beyond {TOLERANCE:g}. A step agrees as in the parity tests: every element "
        f"within {TOLERANCE:g}, but for at most {100 * FLIP_SHARE:g} % of a tensor's, which stay within "
        f"{FLIP_CAP:g} (a ReLU input within rounding of 0 passes its gradient on one machine and not on the "
        "other). \"host weights on board\": the board's `edgebll eval` of the host's trained run (must equal the "
        "host's). \"board's own run\": the board trains from the command line like a user; \"run drift\" is how "
        f"far its weights end from the host's, beside how far the host's own run moves when every block input "
        f"gets N(0, {NOISE:g}) noise: a ReLU flip in one step is carried on by the later ones, so whole runs are "
        "compared by that yardstick, not by 1e-4. Seconds: the board's wall time under emulation, not a "
        "board's speed.\n\n" + table + "\n"
        + (f"\n**Failed:** {', '.join(failed)}\n" if failed else "")
    )
    json_path, md_path = write_results(args.name, {"benchmark": "emulated_board", "machine": machine, "board": facts,
                                                   "settings": settings, "rows": rows}, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path} in {settings['total_seconds']:.0f} s")
    if failed:
        raise SystemExit(f"the emulated board disagrees with the host for {failed}")


if __name__ == "__main__":
    main()
