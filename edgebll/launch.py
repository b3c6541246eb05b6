"""Run a worker per rank: ``edgebll worker`` under MPI, and ``edgebll train --transport mpi`` that starts it.

The worker entry point turns any user error on one rank into a one-line message naming the rank
and ends the whole job (``MPI.Abort``): the other ranks would otherwise wait for it until their
peer timeout. The launcher runs ``mpiexec`` on this host (or across the boards of a hosts file),
passes its output through, and when a rank dies (``kill -9``, out of memory) names it from the pid
that mpiexec reports.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebll.checkpoints import PROGRESS_NAME
from edgebll.errors import EdgeBLLError, TrainingError
from edgebll.json_files import write_json_atomic
from edgebll.options import to_argv
from edgebll.run_folder import load_run_config
from edgebll.runtime import TRAIN_NAME
from edgebll.train_config import TrainConfig, WorkerConfig
from edgebll.worker import RANKS_DIR, Worker, registered_ranks

MPI_HINT = "hint: pip install 'edgebll[mpi]' (mpi4py and MPICH from PyPI; no system packages needed)"


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a clear error when it is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise EdgeBLLError(f"the MPI transport needs mpi4py ({exc}); {MPI_HINT}") from exc
    return MPI


def run_worker(run_dir: str, train: Any, worker: Any, *, threads: int, data_dir: str | None, restart: bool,
               progress: bool, backend: str = "auto", provider: str = "cpu") -> int:
    """The body of ``edgebll worker``: this rank's share of the run; rank 0 prints the summary."""
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    try:
        summary = Worker(run_dir, comm, train, worker, threads=threads, data_dir=data_dir, restart=restart,
                         progress=progress, backend=backend, provider=provider).run()
    except EdgeBLLError as exc:
        line = f"rank {comm.Get_rank()}: error: {type(exc).__name__}: {exc}"
        print(f"edgebll worker: {line}", file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            _record_error(Path(run_dir), comm.Get_rank(), line)
            time.sleep(0.5)  # let mpiexec forward the line before Abort tears its output down
            comm.Abort(2)  # ends every rank now, instead of each one timing out on the missing peer
        return 2
    if summary is not None:
        last = summary["epochs"][-1]
        print(f"trained {summary['steps']} steps on {summary['ranks']} ranks ({summary['schedule']}) · train "
              f"accuracy per block {last['accuracy']} · {summary['samples_per_s']} samples/s · wrote "
              f"{Path(run_dir) / 'train.json'}", flush=True)
    return 0


def _record_error(run_dir: Path, rank: int, line: str) -> None:
    """Keep a rank's last error where the launcher finds it (mpiexec may drop output on Abort)."""
    try:
        (run_dir / RANKS_DIR).mkdir(exist_ok=True)
        write_json_atomic(run_dir / RANKS_DIR / f"rank-{rank}.error.json",
                          json.dumps({"rank": rank, "error": line, "time": time.time()}))
    except OSError:
        pass  # the error is printed anyway; a read-only run folder must not hide it


def worker_argv(train: Any, worker: Any, *, threads: int = 0, data_dir: str | None = None, restart: bool = False,
                progress: bool = True, backend: str = "auto", provider: str = "cpu") -> list[str]:
    """A TrainConfig and a WorkerConfig as ``edgebll worker`` options (what every rank must be told)."""
    valued = {"--data-dir": data_dir, "--threads": threads, "--backend": backend, "--provider": provider}
    out = [item for flag, value in valued.items() if value is not None for item in (flag, str(value))]
    flags = {"--restart": restart, "--no-progress": not progress}
    return to_argv(train) + to_argv(worker) + out + [flag for flag, on in flags.items() if on]


def train_mpi(run_dir: str | os.PathLike, train: Any = None, worker: Any = None, *, ranks: int | None = None,
              threads: int = 0, data_dir: str | None = None, restart: bool = False,
              progress: bool = True, hosts: str | os.PathLike | None = None, backend: str = "auto",
              provider: str = "cpu") -> dict[str, Any]:
    """Train ``run_dir`` on one MPI rank per block; returns train.json's content.

    ``train`` is an ``edgebll.TrainConfig``, ``worker`` an ``edgebll.train_config.WorkerConfig`` (defaults
    when None). The ranks run on this host, or on the boards of ``hosts`` (an MPICH hosts file, see
    :func:`read_hosts`; every board holds the run folder at the same path, and rank 0, on the first
    board, reads the data and writes train.json). The Python face of ``edgebll train RUN --transport
    mpi [--hosts FILE]``. ``backend`` and ``provider`` choose every rank's runtime (see
    :func:`edgebll.backends.open_block`).
    """
    train, worker = train or TrainConfig(), worker or WorkerConfig()
    train.validate()
    worker.validate()
    blocks = load_run_config(run_dir).blocks
    train.check_frozen(blocks)
    ranks = blocks if ranks is None else ranks
    if ranks != blocks:
        raise EdgeBLLError(f"{run_dir} has {blocks} blocks, so it trains on {blocks} ranks, got -n {ranks}; "
                           "hint: re-export with --blocks N to use N devices")
    # each rank is bound to one core: ORT would otherwise start a thread per core of the machine on it
    threads = threads or 1
    launch(str(run_dir), ranks, worker_argv(train, worker, threads=threads, data_dir=data_dir, restart=restart,
                                            progress=progress, backend=backend, provider=provider), hosts=hosts)
    summary = Path(run_dir) / TRAIN_NAME
    if not summary.is_file() and hosts is not None:  # rank 0 ran on another board: its train.json is there
        print(f"edgebll: trained; rank 0 ran on {read_hosts(hosts, ranks)[0]}, so train.json is in {run_dir} there (list this "
              "machine first in the hosts file to have it here)", file=sys.stderr)
        return {}
    return json.loads(summary.read_text())


def read_hosts(path: str | os.PathLike, ranks: int) -> list[str]:
    """The board of every rank, from an MPICH hosts file: one ``host`` or ``host:slots`` per line, ``#``
    comments. Ranks fill the slots in order (rank 0 on the first line); a file with fewer slots than
    ranks is refused, since MPICH would put two blocks on one board."""
    file = Path(path)
    if not file.is_file():
        raise EdgeBLLError(f"--hosts {path}: no such file; hint: write one board per line (host or host:slots)")
    boards: list[str] = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        host, _, slots = entry.partition(":")
        if not host or (slots and (not slots.isdigit() or int(slots) < 1)) or " " in entry:
            raise EdgeBLLError(f"--hosts {path}, line {number}: {entry!r} is not host or host:slots "
                               "(slots a whole number >= 1)")
        boards += [host] * (int(slots) if slots else 1)
    if len(boards) < ranks:
        raise EdgeBLLError(f"--hosts {path} lists {len(boards)} slot(s) for {ranks} ranks (one per block); hint: "
                           "one line per board, or host:N for a board that takes N blocks")
    return boards[:ranks]


def find_mpiexec() -> str:
    """mpiexec next to this Python (a venv with the ``mpich`` wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise EdgeBLLError(f"--transport mpi: no mpiexec next to {sys.executable} or on PATH; {MPI_HINT}")
    return found


class _FirstExit:
    """Watches the ranks' processes on this host and records which one ended first.

    mpiexec stops every rank once one dies and then names one of the pids, not always the first
    to go; a pidfd becomes readable the moment its process ends, so a thread blocked in poll()
    sees the rank that died before mpiexec has killed the rest.
    """

    def __init__(self, run_dir: Path, ranks: int, process: subprocess.Popen) -> None:
        self.run_dir, self.ranks, self.process = run_dir, ranks, process
        self.rank: int | None = None
        self.when: float | None = None  # time.time() when it was seen to end
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        fds: dict[int, int] = {}
        poller = select.poll()
        while len(fds) < self.ranks and self.process.poll() is None:  # the ranks register at start-up
            watched = set(fds.values())
            for rank, info in registered_ranks(self.run_dir).items():
                if rank in watched:
                    continue
                try:
                    fd = os.pidfd_open(int(info["pid"]))
                except (OSError, ValueError, KeyError, AttributeError):
                    continue
                fds[fd] = rank
                poller.register(fd, select.POLLIN)
            time.sleep(0.01)
        try:
            while self.rank is None and self.process.poll() is None and fds:
                ended = [fds[fd] for fd, _ in poller.poll(200)]
                if ended:
                    self.when = time.time()
                    self.rank = min(ended) if len(ended) > 1 else ended[0]
        finally:
            for fd in fds:
                os.close(fd)


def launch(run_dir: str, ranks: int, worker_args: Sequence[str], *, bind: bool = True,
           hosts: str | os.PathLike | None = None) -> int:
    """Start ``ranks`` workers with mpiexec, on this host or the boards of ``hosts`` (MPICH's ``-f``);
    returns 0, or raises naming the rank that failed."""
    import_mpi()
    command = [find_mpiexec(), "-n", str(ranks)]
    shutil.rmtree(Path(run_dir) / RANKS_DIR, ignore_errors=True)  # pids of an earlier run would mislead
    if hosts is not None:
        # mpiexec's own parser stops at a comment after a host name: it gets one plain line per rank
        machinefile = Path(run_dir) / RANKS_DIR / "hosts"
        machinefile.parent.mkdir(parents=True, exist_ok=True)
        machinefile.write_text("".join(f"{board}\n" for board in read_hosts(hosts, ranks)))
        command += ["-f", str(machinefile)]
    if bind:
        command += ["-bind-to", "core"]  # one rank per core, as one block per board would be
    command += [sys.executable, "-m", "edgebll", "worker", run_dir, *worker_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_exit = _FirstExit(Path(run_dir), ranks, process)
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
    raise TrainingError(explain_failure(Path(run_dir), tail.decode(errors="replace"), code, ranks, first_exit.rank,
                                        first_exit.when, hosts=hosts))


def explain_failure(run_dir: Path, output: str, code: int, ranks: int, first_exit: int | None = None,
                    first_exit_at: float | None = None, hosts: str | os.PathLike | None = None) -> str:
    """One line: which rank failed and how, what is safe on disk, how to go on.

    ``first_exit``: the rank whose process ended first, where the launcher could see it, at
    ``first_exit_at`` (time.time()). A rank that recorded its error before then stopped the run
    (its MPI_Abort makes mpiexec kill the others, in any order); otherwise the first to end died.
    """
    by_rank = registered_ranks(run_dir)
    pids = {int(info["pid"]): info for info in by_rank.values()}
    recorded, recorded_at = {}, {}
    for path in run_dir.glob(f"{RANKS_DIR}/rank-*.error.json"):
        record = json.loads(path.read_text())
        recorded[int(record["rank"])] = record["error"].split(": error: ", 1)[-1]
        recorded_at[int(record["rank"])] = float(record.get("time", 0.0))
    reported = re.search(r"rank (\d+): error: (.*)", output)
    if reported and int(reported.group(1)) not in recorded:
        recorded[int(reported.group(1))] = reported.group(2).strip()
    died = re.search(r"PID (\d+) RUNNING AT (\S+)\s*=\s*EXIT CODE: (\d+)", output)
    who = "a rank"
    reported_first = first_exit_at is not None and any(t <= first_exit_at for t in recorded_at.values())
    if first_exit is not None and first_exit not in recorded and not reported_first:  # ended first, said nothing
        info = by_rank.get(first_exit, {})
        who = (f"rank {first_exit} (block {first_exit}) died (pid {info.get('pid', '?')} on {info.get('host', '?')}) "
               "and mpiexec stopped the other ranks")
    elif recorded:
        rank = first_exit if first_exit in recorded else min(recorded, key=lambda r: (recorded_at.get(r, 0.0), r))
        # a generic "--resume" hint is replaced by the one below, which knows whether a checkpoint exists
        error = re.sub(r"; hint: (check its log; )?completed checkpoints can be resumed.*$", "", recorded[rank])
        who = f"rank {rank} (block {rank}) stopped the run: {error}"
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
    again = ("--resume" if saved is not None else "--restart") + (f" --hosts {hosts}" if hosts is not None else "")
    return (f"{run_dir}: the MPI run on {ranks} ranks failed (exit code {code}): {who}; {safe}; hint: fix the cause "
            f"and continue with `edgebll train {run_dir} --transport mpi -n {ranks} {again}`")
