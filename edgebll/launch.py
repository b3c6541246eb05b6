"""Run a worker per rank: ``edgebll worker`` under MPI, and ``edgebll train --transport mpi`` that starts it.

The worker entry point turns any user error on one rank into a one-line message naming the rank
and ends the whole job (``MPI.Abort``): the other ranks would otherwise wait for it until their
peer timeout. The launcher runs ``mpiexec`` on this host, passes its output through, and when a
rank dies (``kill -9``, out of memory) names it from the pid that mpiexec reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebll.errors import EdgeBLLError, TrainingError

MPI_HINT = "hint: pip install 'edgebll[mpi]' (mpi4py and MPICH from PyPI; no system packages needed)"


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a clear error when it is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise EdgeBLLError(f"the MPI transport needs mpi4py ({exc}); {MPI_HINT}") from exc
    return MPI


def run_worker(run_dir: str, train: Any, worker: Any, *, threads: int, data_dir: str | None, restart: bool,
               progress: bool) -> int:
    """The body of ``edgebll worker``: this rank's share of the run; rank 0 prints the summary."""
    MPI = import_mpi()
    from edgebll.worker import Worker

    comm = MPI.COMM_WORLD
    try:
        summary = Worker(run_dir, comm, train, worker, threads=threads, data_dir=data_dir, restart=restart,
                         progress=progress).run()
    except EdgeBLLError as exc:
        print(f"edgebll worker: rank {comm.Get_rank()}: error: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        if comm.Get_size() > 1:
            comm.Abort(2)  # ends every rank now, instead of each one timing out on the missing peer
        return 2
    if summary is not None:
        last = summary["epochs"][-1]
        print(f"trained {summary['steps']} steps on {summary['ranks']} ranks ({summary['schedule']}) · train "
              f"accuracy per block {last['accuracy']} · {summary['samples_per_s']} samples/s · wrote "
              f"{Path(run_dir) / 'train.json'}", flush=True)
    return 0


def find_mpiexec() -> str:
    """mpiexec next to this Python (a venv with the ``mpich`` wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise EdgeBLLError(f"--transport mpi: no mpiexec next to {sys.executable} or on PATH; {MPI_HINT}")
    return found


def launch(run_dir: str, ranks: int, worker_args: Sequence[str], *, bind: bool = True) -> int:
    """Start ``ranks`` workers on this host with mpiexec; returns 0, or raises naming the rank that failed."""
    import_mpi()
    command = [find_mpiexec(), "-n", str(ranks)]
    if bind:
        command += ["-bind-to", "core"]  # one rank per core, as one block per board would be
    command += [sys.executable, "-m", "edgebll", "worker", run_dir, *worker_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = bytearray()
    assert process.stdout is not None
    # pass the output through unchanged (progress bars use \r) and keep the end to explain a failure
    while chunk := os.read(process.stdout.fileno(), 1 << 16):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        tail = (tail + chunk)[-(1 << 16):]
    code = process.wait()
    if code == 0:
        return 0
    raise TrainingError(explain_failure(Path(run_dir), tail.decode(errors="replace"), code, ranks))


def explain_failure(run_dir: Path, output: str, code: int, ranks: int) -> str:
    """One line: which rank failed and how, what is safe on disk, how to go on."""
    from edgebll.worker import PROGRESS_NAME, RANKS_DIR

    pids = {}
    for path in (run_dir / RANKS_DIR).glob("rank-*.json"):
        info = json.loads(path.read_text())
        pids[int(info["pid"])] = info
    who = "a rank"
    reported = re.search(r"rank (\d+): error: (.*)", output)
    died = re.search(r"PID (\d+) RUNNING AT (\S+)\s*=\s*EXIT CODE: (\d+)", output)
    if reported:
        who = f"rank {reported.group(1)} (block {reported.group(1)}) stopped the run: {reported.group(2).strip()}"
    elif died:
        pid, host, exit_code = int(died.group(1)), died.group(2), int(died.group(3))
        info = pids.get(pid)
        name = f"rank {info['rank']} (block {info['block']})" if info else f"the rank with pid {pid}"
        how = f"killed by signal {exit_code}" if exit_code in (9, 15, 6, 11) else f"exit code {exit_code}"
        who = f"{name} died on {host} ({how}); mpiexec stopped the other ranks"
    progress = run_dir / PROGRESS_NAME
    saved = json.loads(progress.read_text())["step"] if progress.is_file() else None
    safe = (f"every rank's checkpoint of step {saved} is complete ({progress})" if saved is not None
            else "no step was checkpointed by every rank yet")
    return (f"{run_dir}: the MPI run on {ranks} ranks failed (exit code {code}): {who}; {safe}; hint: fix the cause "
            f"and continue with `edgebll train {run_dir} --transport mpi -n {ranks} --resume`")
