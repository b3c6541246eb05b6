"""The MPI transport: 2-3 ranks over loopback, against the single-process runtime.

Each test starts ``edgebll train --transport mpi`` (mpiexec with one rank per block) on real
Fashion-MNIST images, as a user would, and checks weights, train.json, and what a failure leaves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgebll.errors import EdgeBLLError
from edgebll.runner import BlockRunner
from edgebll.runtime import Runtime
from tests.conftest import require_real_data

pytest.importorskip("mpi4py", reason="the MPI transport needs mpi4py (pip install 'edgebll[mpi]'; make test does)")
pytestmark = pytest.mark.slow

LIMIT = 128  # 8 steps of 16 per epoch


@pytest.fixture(scope="module")
def bll_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block BLL run of the tiny conv net (forward and feedback blocks on every rank but the last)."""
    import torch
    from torch import nn

    from edgebll.export import export_model
    from edgebll.export.models import conv_bn_relu

    torch.manual_seed(0)
    units = [nn.Sequential(*conv_bn_relu(1, 4)), nn.Sequential(*conv_bn_relu(4, 8, 2)),
             nn.Sequential(*conv_bn_relu(8, 8, 2))]
    out = tmp_path_factory.mktemp("runs") / "bll"
    export_model(units, out=out, method="bll", blocks=3, batch_size=16, lr=0.01, progress=False)
    return out


FAULTS = Path(__file__).resolve().parent / "faults"
"""On PYTHONPATH with EDGEBLL_INJECT_FAULT set: its sitecustomize.py injects the fault into every rank."""


def edgebll(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    if "EDGEBLL_INJECT_FAULT" in env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "edgebll", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def mpi_train(run: Path, *args: str, ranks: int = 3, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return edgebll("train", str(run), "--transport", "mpi", "-n", str(ranks), "--limit", str(LIMIT), "--threads", "1",
                   "--no-progress", "--data-dir", str(require_real_data()), *args, env=env)


def weights(run: Path, blocks: int = 3, runner: type = BlockRunner) -> dict[str, np.ndarray]:
    folders = [run / f"block-{k}" for k in range(blocks)] + [p for p in sorted(run.glob("block-*/feedback"))]
    return {f"{folder.relative_to(run)}/{name}": value for folder in folders
            for name, value in runner(folder).parameters().items()}


def assert_same_weights(a: Path, b: Path, blocks: int = 3, runner: type = BlockRunner) -> None:
    wa, wb = weights(a, blocks, runner), weights(b, blocks, runner)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=1e-6, err_msg=name)


def in_process(run: Path, tmp_path: Path, backend: str = "auto", **config: object) -> Path:
    reference = Path(shutil.copytree(run, tmp_path / "inprocess"))
    Runtime.from_run(reference, threads=1, backend=backend).train(limit=LIMIT, data_dir=str(require_real_data()),
                                                                  progress=False, **config)
    return reference


SCHEDULES = {"pipelined": [], "sync": ["--sync"], "no-lookahead": ["--feedback-lookahead", "0"]}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_mpi_run_ends_with_the_in_process_weights(bll_run: Path, tmp_path: Path, schedule: str) -> None:
    # however far the feedback pass runs ahead, every block sees the in-process inputs: no stale beta
    reference = in_process(bll_run, tmp_path, epochs=2)
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    done = mpi_train(run, "--epochs", "2", *SCHEDULES[schedule])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(reference, run)
    summary = json.loads((run / "train.json").read_text())
    expected = json.loads((reference / "train.json").read_text())
    assert summary["transport"] == "mpi" and summary["ranks"] == 3
    assert summary["schedule"] == ("sync" if schedule == "sync" else "pipelined")
    assert summary["samples"] == 2 * LIMIT and summary["samples_per_s"] > 0
    assert summary["message_bytes_per_sample"] == expected["message_bytes_per_sample"]
    for got, want in zip(summary["epochs"], expected["epochs"], strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], atol=1e-5)
        # the same figures per epoch: BLL's KL and feedback loss per sample, whichever transport counted them
        np.testing.assert_allclose(got["kl"], want["kl"], atol=1e-5)
        np.testing.assert_allclose(got["feedback_loss"], want["feedback_loss"], atol=1e-5)
        assert got["accuracy"] == want["accuracy"] and got["samples_per_block"] == [LIMIT] * 3
    assert json.loads((run / "progress.json").read_text())["step"] == 16
    # eval works on an MPI-trained run as on any other
    evaluation = edgebll("eval", str(run), "--limit", "200", "--no-progress", "--data-dir", str(require_real_data()))
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.loads((run / "eval.json").read_text())["samples"] == 200


def test_validation_over_mpi_counts_what_the_in_process_runtime_counts(bll_run: Path, tmp_path: Path) -> None:
    """--val-split over MPI: the same held-out images through the forward chain of ranks, every epoch, and a
    resume keeps the epochs already validated."""
    reference = in_process(bll_run, tmp_path, epochs=2, val_split=700)  # 700: a last batch shorter than 16
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    crashed = mpi_train(run, "--epochs", "2", "--val-split", "700", "--checkpoint-every", "3",
                        env={"EDGEBLL_INJECT_FAULT": "kill:2:12"})
    assert crashed.returncode == 2, crashed.stdout + crashed.stderr
    resumed = mpi_train(run, "--epochs", "2", "--val-split", "700", "--checkpoint-every", "3", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_weights(reference, run)
    got = json.loads((run / "train.json").read_text())["epochs"]
    want = json.loads((reference / "train.json").read_text())["epochs"]
    assert [e["samples_per_block"] for e in got] == [[LIMIT] * 3] * 2  # the held-out images were never trained on
    for mine, theirs in zip(got, want, strict=True):
        assert mine["validation_accuracy"] == theirs["validation_accuracy"]
        assert mine["validation_loss"] == pytest.approx(theirs["validation_loss"], abs=1e-5)


def test_a_killed_rank_is_named_and_the_run_resumes_to_the_same_weights(bll_run: Path, tmp_path: Path) -> None:
    reference = in_process(bll_run, tmp_path, epochs=2)
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    began = time.monotonic()
    # rank 1 is killed (SIGKILL) before its step 11, in epoch 2; checkpoints every 3 steps
    crashed = mpi_train(run, "--epochs", "2", "--checkpoint-every", "3", env={"EDGEBLL_INJECT_FAULT": "kill:1:11"})
    assert time.monotonic() - began < 120
    assert crashed.returncode == 2, crashed.stdout + crashed.stderr
    # named by mpiexec's report of the pid, or by the neighbour that saw its link break first
    assert "rank 1 (block 1) died" in crashed.stderr, crashed.stderr
    marker = json.loads((run / "progress.json").read_text())["step"]
    assert marker in (8, 9)  # rank 1 saved step 9 only if it got there before dying; never beyond
    for folder in [run / f"block-{k}" for k in range(3)] + sorted(run.glob("block-*/feedback")):
        BlockRunner(folder)  # every checkpoint left is complete (sha256 checked against its sidecar)
        assert (folder / "trained" / "history" / f"step-{marker}" / "checkpoint").is_file()

    resumed = mpi_train(run, "--epochs", "2", "--checkpoint-every", "3", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_weights(reference, run)
    summary = json.loads((run / "train.json").read_text())
    assert summary["resumed_from_step"] == marker
    # no sample skipped or doubled: each block trained exactly LIMIT samples in each epoch, across the crash
    assert [e["samples_per_block"] for e in summary["epochs"]] == [[LIMIT] * 3, [LIMIT] * 3]


def test_the_portable_backend_over_mpi_resumes_to_the_in_process_weights(bll_run: Path, tmp_path: Path) -> None:
    """BLL's forward and feedback blocks on plain onnxruntime's portable graphs, pipelined over 3 ranks, a rank
    killed and the run resumed: the weights are the in-process portable run's."""
    from edgebll.portable import PortableRunner

    reference = in_process(bll_run, tmp_path, backend="portable", epochs=2)
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    crashed = mpi_train(run, "--epochs", "2", "--checkpoint-every", "3", "--backend", "portable",
                        env={"EDGEBLL_INJECT_FAULT": "kill:1:11"})
    assert crashed.returncode == 2, crashed.stdout + crashed.stderr
    resumed = mpi_train(run, "--epochs", "2", "--checkpoint-every", "3", "--backend", "portable", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_weights(reference, run, runner=PortableRunner)
    for folder in [run / f"block-{k}" for k in range(3)] + sorted(run.glob("block-*/feedback")):
        assert sorted(p.name for p in (folder / "trained").iterdir() if p.is_file()) == [
            "portable_state.json", "portable_state.npz"]  # nothing of the training build was written


@pytest.mark.parametrize(("fault", "says"), [
    ("corrupt", "rejected the activation frame from rank 0 for step 5: "),
    ("misstep", "the activation from rank 0 for step 5 was rejected: its envelope says magic b'EBLM', rank 0, step 6"),
    ("reshape", "rejected the activation frame from rank 0 for step 5: shape [15, 4, 28, 28], but the block takes "
                "[16, 4, 28, 28]"),
])
def test_a_bad_frame_is_rejected_naming_sender_and_step(bll_run: Path, tmp_path: Path, fault: str, says: str) -> None:
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    failed = mpi_train(run, env={"EDGEBLL_INJECT_FAULT": f"{fault}:0:5"})
    assert failed.returncode == 2
    # the launcher's one line, from the error the rank recorded before it stopped the job
    assert "rank 1 (block 1) stopped the run: PeerError: rank 1" in failed.stderr, failed.stdout + failed.stderr
    assert says in failed.stderr and "it was not fed to the block" in failed.stderr, failed.stderr
    if fault == "corrupt":
        assert "CRC32" in failed.stderr
    assert not (run / "block-1" / "trained").exists()  # the run stopped at step 5, before any checkpoint


def test_wrong_number_of_ranks_is_refused(bll_run: Path) -> None:
    done = mpi_train(bll_run, ranks=2)
    assert done.returncode == 2
    assert "has 3 blocks, so it trains on 3 ranks, got -n 2" in done.stderr


def test_train_mpi_from_python_matches_in_process_for_bwbpf(tiny_run: Path, tmp_path: Path) -> None:
    from edgebll.launch import train_mpi
    from edgebll.runtime import TrainConfig
    from edgebll.worker import WorkerConfig

    reference = in_process(tiny_run, tmp_path, epochs=1, codec="int4", granularity="channel")
    run = Path(shutil.copytree(tiny_run, tmp_path / "mpi"))
    summary = train_mpi(run, TrainConfig(limit=LIMIT, codec="int4", granularity="channel"),
                        WorkerConfig(max_in_flight=1), threads=1, data_dir=str(require_real_data()), progress=False)
    assert summary["transport"] == "mpi" and summary["method"] == "bwbpf" and summary["steps"] == 8
    assert summary["config"]["max_in_flight"] == 1
    from edgebll.codec import frame_nbytes

    sent = [frame_nbytes([16, 4, 28, 28], "int4", "channel") + 16, frame_nbytes([16, 8, 14, 14], "int4", "channel") + 16]
    # one frame in flight per link, on each side: what the ranks hold beyond their blocks
    assert summary["link_buffer_bytes_per_rank"] == [sent[0], sent[0] + sent[1], sent[1]]
    assert_same_weights(reference, run)


def test_the_sequence_task_over_mpi_matches_in_process(tmp_path: Path) -> None:
    """The transformer (token ids in, per-token labels and latents): rank 0 loads run.json's dataset, the
    labels [N, T] are broadcast, accuracy is per token, and the weights are the single process's."""
    from edgebll.export import export_model

    run = export_model("transformer", out=tmp_path / "t", method="bll", blocks=3, batch_size=16, progress=False,
                       portable=False)
    reference = in_process(run, tmp_path, epochs=1)
    done = mpi_train(run, "--epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(reference, run)
    got, want = (json.loads((r / "train.json").read_text())["epochs"][-1] for r in (run, reference))
    assert got["accuracy"] == want["accuracy"] and got["samples_per_block"] == [LIMIT] * 3
    np.testing.assert_allclose(got["loss"], want["loss"], atol=1e-5)


def test_the_estimate_counts_what_the_links_hold(tiny_run: Path, tmp_path: Path) -> None:
    from edgebll.memory import estimate_peak_bytes

    run = Path(shutil.copytree(tiny_run, tmp_path / "mpi"))
    done = mpi_train(run, "--max-in-flight", "3", "--codec", "int8")
    assert done.returncode == 0, done.stdout + done.stderr
    held = json.loads((run / "train.json").read_text())["link_buffer_bytes_per_rank"]
    for k in range(3):
        extra = (estimate_peak_bytes(run / f"block-{k}", in_flight=3).total
                 - estimate_peak_bytes(run / f"block-{k}").total)
        assert extra == held[k], k


def test_validation_links_are_counted_and_use_the_training_batch(tiny_run: Path, tmp_path: Path) -> None:
    """--val-split over MPI sends the held-out images in batches of the training size (so validation never
    needs more memory than a training step) on a second ring per link, which train.json and the estimate count."""
    from edgebll.memory import estimate_peak_bytes

    run = Path(shutil.copytree(tiny_run, tmp_path / "mpi"))
    done = mpi_train(run, "--max-in-flight", "3", "--codec", "int8", "--val-split", "40")
    assert done.returncode == 0, done.stdout + done.stderr
    held = json.loads((run / "train.json").read_text())["link_buffer_bytes_per_rank"]
    for k in range(3):
        extra = (estimate_peak_bytes(run / f"block-{k}", in_flight=3, validation=True).total
                 - estimate_peak_bytes(run / f"block-{k}").total)
        assert extra == held[k] == 2 * (estimate_peak_bytes(run / f"block-{k}", in_flight=3).total
                                       - estimate_peak_bytes(run / f"block-{k}").total), k


def test_a_rank_that_hangs_is_named_by_its_neighbour_after_the_peer_timeout(bll_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(bll_run, tmp_path / "mpi"))
    began = time.monotonic()
    failed = mpi_train(run, "--peer-timeout", "3", env={"EDGEBLL_INJECT_FAULT": "hang:1:5"})
    assert time.monotonic() - began < 60  # no hang: the neighbours give up after 3 s and stop the job
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "nothing within 3 s; rank 1 (block 1) has died or hangs" in failed.stderr, failed.stderr


def test_resume_never_deletes_weights_that_no_common_checkpoint_covers(tiny_run: Path, tmp_path: Path) -> None:
    run = in_process(tiny_run, tmp_path, epochs=1)
    (run / "progress.json").unlink()  # as if the run died before every block had saved one step
    before = weights(run)
    done = mpi_train(run, "--epochs", "2", "--resume")
    assert done.returncode == 2
    assert "--resume finds no progress.json" in done.stderr and "--restart to start over" in done.stderr
    after = weights(run)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_a_run_checkpointed_in_one_process_resumes_over_mpi(tiny_run: Path, tmp_path: Path) -> None:
    """One checkpoint layout for both transports: an epoch in one process, the next over MPI, the in-process
    weights of two epochs, and a train.json whose first epoch is the one trained in process (the stages' totals
    travel in the checkpoint whichever transport wrote it)."""
    reference = in_process(tiny_run, tmp_path, epochs=2, schedule="constant")  # so that 1 epoch of 2 = 1 of 1
    run = Path(shutil.copytree(tiny_run, tmp_path / "switched"))
    Runtime.from_run(run, threads=1).train(limit=LIMIT, data_dir=str(require_real_data()), progress=False, epochs=1,
                                           schedule="constant")
    done = mpi_train(run, "--epochs", "2", "--resume", "--schedule", "constant")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(reference, run)
    got, want = (json.loads((r / "train.json").read_text()) for r in (run, reference))
    assert got["resumed_from_step"] == 8 and got["message_bytes_per_step"] == want["message_bytes_per_step"]
    for mine, theirs in zip(got["epochs"], want["epochs"], strict=True):
        assert mine["accuracy"] == theirs["accuracy"] and mine["samples_per_block"] == [LIMIT] * 3
        np.testing.assert_allclose(mine["loss"], theirs["loss"], atol=1e-5)


def test_cutout_over_mpi_cuts_the_in_process_pixels(tiny_run: Path, tmp_path: Path) -> None:
    reference = in_process(tiny_run, tmp_path, epochs=1, cutout=10)
    run = Path(shutil.copytree(tiny_run, tmp_path / "mpi"))
    done = mpi_train(run, "--cutout", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(reference, run)


@pytest.mark.parametrize("recorded_at, first_exit_at, expected", [
    (99.0, 100.0, "rank 0 (block 0) stopped the run: PeerError: nothing within 3 s"),  # rank 0 aborted; 1 was killed
    (101.0, 100.0, "rank 1 (block 1) died (pid 4242 on board-1)"),  # 1 died; 0 noticed afterwards
])
def test_the_failure_names_whoever_went_first(tmp_path: Path, recorded_at: float, first_exit_at: float,
                                              expected: str) -> None:
    """mpiexec kills the others in any order once a rank aborts; the launcher orders by the error record's time."""
    from edgebll.launch import explain_failure
    from edgebll.worker import RANKS_DIR

    ranks = tmp_path / RANKS_DIR
    ranks.mkdir()
    for rank in (0, 1):
        info = {"rank": rank, "block": rank, "pid": 4241 + rank, "host": f"board-{rank}"}
        (ranks / f"rank-{rank}.json").write_text(json.dumps(info))
    (ranks / "rank-1.json.tmp").write_text("{half a fi")  # a write in progress is skipped, not fatal
    error = "rank 0: error: PeerError: nothing within 3 s; rank 1 (block 1) has died or hangs"
    (ranks / "rank-0.error.json").write_text(json.dumps({"rank": 0, "error": error, "time": recorded_at}))
    line = explain_failure(tmp_path, "", 2, 2, first_exit=1, first_exit_at=first_exit_at)
    assert expected in line, line
    assert line.endswith("--transport mpi -n 2 --restart`")


def test_a_hosts_file_places_one_rank_per_slot(tiny_run: Path, tmp_path: Path) -> None:
    """--hosts: MPICH's hosts file, here this machine three times over; the weights are the in-process ones."""
    reference = in_process(tiny_run, tmp_path, epochs=1)
    run = Path(shutil.copytree(tiny_run, tmp_path / "mpi"))
    hosts = tmp_path / "hosts"
    host = socket.gethostname()  # one name for all three: two names for one machine make MPICH use TCP between them
    hosts.write_text(f"# three boards\n{host}   # rank 0: block 0 and the data\n\n{host}:2\n")
    done = mpi_train(run, "--hosts", str(hosts))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(reference, run)
    assert json.loads((run / "train.json").read_text())["ranks"] == 3


def test_a_bad_hosts_file_is_refused(tmp_path: Path) -> None:
    from edgebll.launch import explain_failure, read_hosts

    hosts = tmp_path / "hosts"
    with pytest.raises(EdgeBLLError, match="no such file; hint: write one board per line"):
        read_hosts(hosts, 2)
    hosts.write_text("pi1\npi2:2  # two blocks\n")
    assert read_hosts(hosts, 3) == ["pi1", "pi2", "pi2"] and read_hosts(hosts, 2) == ["pi1", "pi2"]
    with pytest.raises(EdgeBLLError, match=r"lists 3 slot\(s\) for 4 ranks \(one per block\)"):
        read_hosts(hosts, 4)
    for bad in ("pi1:0", "pi1:two", ":3", "pi1 pi2"):
        hosts.write_text(f"{bad}\n")
        with pytest.raises(EdgeBLLError, match=f"line 1: '{bad}' is not host or host:slots"):
            read_hosts(hosts, 1)
    assert explain_failure(tmp_path, "", 1, 2, hosts="hosts").endswith("-n 2 --restart --hosts hosts`")


def test_hosts_needs_the_mpi_transport(tiny_run: Path) -> None:
    done = edgebll("train", str(tiny_run), "--hosts", "hosts", "--no-progress")
    assert done.returncode == 2 and "--hosts needs --transport mpi" in done.stderr
