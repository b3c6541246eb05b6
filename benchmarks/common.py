"""What every benchmark script shares: a description of the machine, and writing its results.

Each script writes ``benchmarks/results/<name>.json`` (everything measured, with the machine and
the settings) and ``benchmarks/results/<name>.md`` (the table the README quotes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Modules whose versions machine_info() records, read from the installed distributions' metadata
# so that recording torch's version neither imports torch nor fails where it is absent (device venv).
PACKAGES = ("numpy", "torch", "onnx", "onnxruntime")


def _cpu_model() -> str | None:
    """The "model name" line of /proc/cpuinfo (Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_bytes() -> int | None:
    """MemTotal from /proc/meminfo (Linux); None where there is none."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _usable_cores() -> int | None:
    """Cores this process may run on (a container's CPU set can be smaller than os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return None


def package_version(module: str) -> str | None:
    """Installed version of the distribution that provides ``module``; None if absent.

    Reads package metadata, so it imports nothing: ``onnxruntime`` finds onnxruntime-training(-cpu).
    """
    distributions = importlib.metadata.packages_distributions().get(module, [module])
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot, summed over cores (Linux /proc/stat)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user and nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (subprocesses it ran, and theirs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(slots=True)
class OtherProcessesCpu:
    """CPU that other processes used while a ``with other_processes_cpu()`` block ran."""

    cores: float | None = None
    """Average number of cores busy with other processes (0 on an idle machine); None where unknown."""


@contextlib.contextmanager
def other_processes_cpu() -> Iterator[OtherProcessesCpu]:
    """Measure how many cores other processes kept busy during the block: timings are clean only near 0.

    Everything busy on the machine (/proc/stat) minus this process's own CPU time and that of the
    subprocesses it ran and waited for (an MPI run's ranks, a profiled block), over the wall time.
    Resolution is one clock tick (10 ms) per core, so blocks shorter than a second read coarsely.
    """
    result = OtherProcessesCpu()
    busy, own, wall = _system_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    yield result
    busy_end = _system_busy_seconds()
    elapsed = time.perf_counter() - wall
    if busy is not None and busy_end is not None and elapsed > 0:
        others = (busy_end - busy) - (_own_cpu_seconds() - own)
        result.cores = round(max(others, 0.0) / elapsed, 2)


def machine_info(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores, memory, OS, Python and the versions of ``packages``."""
    return {
        "cpu_model": _cpu_model(),
        "processor": platform.processor() or None,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in packages},
        "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine of ``machine_info()``, for the header of a results table."""
    cores = info.get("usable_cores") or info.get("cpu_count")
    memory = info.get("memory_bytes")
    versions = ", ".join(f"{name} {version}" for name, version in info.get("packages", {}).items() if version)
    parts = [
        info.get("cpu_model") or info.get("processor") or info.get("machine") or "unknown CPU",
        f"{cores} cores" if cores else None,
        f"{memory / 2**30:.0f} GiB RAM" if memory else None,
        f"Python {info.get('python')}",
        versions or None,
    ]
    return "; ".join(p for p in parts if p)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column, "l" or "r" (default: all "l")."""
    align = align or "l" * len(headers)
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError(f"markdown_table: {len(headers)} headers, align {align!r}, row lengths "
                         f"{sorted({len(r) for r in rows})}; all must match")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(name: str, data: dict[str, Any], markdown: str, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.json`` and ``<name>.md`` (a ``name`` may be a path); returns both paths."""
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(json_path, json.dumps(data, indent=1) + "\n")
    _write_atomic(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


def publish(name: str, settings: dict[str, Any], rows: list[dict[str, Any]],
            render: Callable[[dict[str, Any]], str], results_dir: Path = RESULTS_DIR,
            keep: Path | None = None) -> tuple[Path, Path]:
    """The end of a benchmark: describe the machine, write ``<name>.json`` (machine, settings, rows) and
    ``<name>.md`` (``render(machine)``) in ``results_dir``, print the table and where both went, and
    delete ``keep`` (``run_all``'s finished runs, now in the results)."""
    machine = machine_info()
    json_path, md_path = write_results(name, {"machine": machine, "settings": settings, "rows": rows}, render(machine),
                                       results_dir)
    if keep is not None:
        keep.unlink(missing_ok=True)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def shape_sweep(argv: list[str] | None, *, description: str, name: str, shapes: Sequence[Any],
                time_shape: Callable[..., dict[str, Any]],
                render: Callable[[list[dict[str, Any]], dict[str, Any], dict[str, Any]], str]) -> None:
    """The main of a benchmark that times one op's graphs per shape at 1 and 2 threads: ``--batch``,
    ``--rounds`` and ``--name`` from the command line, ``time_shape(shape, threads=, batch=, rounds=)`` per
    row, then :func:`publish` with ``render(rows, settings, machine)``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=64, help="samples per run (default: 64)")
    parser.add_argument("--rounds", type=int, default=15, help="timed runs of each graph (default: 15)")
    parser.add_argument("--name", default=name, help=f"results file stem (default: {name})")
    args = parser.parse_args(argv)
    rows = [time_shape(shape, threads=t, batch=args.batch, rounds=args.rounds) for shape in shapes for t in (1, 2)]
    settings = {"batch": args.batch, "rounds": args.rounds}
    publish(args.name, settings, rows, lambda machine: render(rows, settings, machine))


def keep_path(name: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Where ``run_all`` keeps the finished runs of benchmark ``name`` until ``publish`` writes its results."""
    results = results_dir / name  # a name may be a path (gpu_session.sh writes to $OUT/NAME)
    return results.with_name(f".{results.name}.partial.jsonl")


def differing_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between settings ``a`` and ``b`` (a key missing on one side differs)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _load_kept(keep: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Finished results in ``keep`` by item key; refuses a file written under other settings."""
    kept: dict[str, Any] = {}
    with keep.open(encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if lines and lines[0].get("settings") != json.loads(json.dumps(settings)):
        old = lines[0].get("settings") or {}
        differ = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
                           for k in differing_settings(old, settings))
        raise SystemExit(f"{keep} holds finished runs of other settings ({differ}); rerun with those settings to "
                         f"finish them, or delete the file to start over")
    for line in lines[1:]:
        kept[json.dumps(line["item"])] = line["result"]
    return kept


def run_all(fn: Callable[..., Any], items: Sequence[Any], *args: Any, jobs: int = 1, desc: str = "runs",
            keep: Path | None = None, settings: dict[str, Any] | None = None) -> list[Any]:
    """``[fn(item, *args) for item in items]`` with a progress bar, ``jobs`` at a time in separate processes.

    The processes are spawned, not forked (ORT's thread pools do not survive a fork); ``fn`` must be
    a module-level function. The results come back in ``items``' order.

    With ``keep`` (a JSON-lines file), every result is written there as soon as its run ends, and a
    rerun under the same ``settings`` reuses the results already there: a benchmark of hours that
    dies (a crash, a session's end) loses only the runs in flight; ``publish(..., keep=keep)``
    deletes the file once the results are written. A failed run is raised as a RuntimeError: with
    one job at once, the benchmark stops there; with several, after all the other runs have ended.
    """
    from tqdm import tqdm

    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {jobs}")
    kept: dict[str, Any] = {}
    if keep is not None:
        if keep.is_file():
            kept = _load_kept(keep, settings or {})
        else:
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_text(json.dumps({"settings": settings or {}}) + "\n", encoding="utf-8")
    results: dict[str, Any] = {key: kept[key] for key in map(_item_key, items) if key in kept}
    todo = [item for item in items if _item_key(item) not in results]
    if results:
        print(f"{desc}: reusing {len(results)} finished run(s) from {keep}; {len(todo)} to go")

    def done(item: Any, result: Any) -> None:
        results[_item_key(item)] = result
        if keep is not None:
            with keep.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"item": item, "result": result}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    failures: list[tuple[Any, BaseException]] = []
    if jobs == 1:
        for item in tqdm(todo, desc=desc, unit="run"):
            try:
                done(item, fn(item, *args))
            except Exception as exc:  # noqa: BLE001 (one process: a failure ends the benchmark at once)
                failures.append((item, exc))
                break
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, item, *args): item for item in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="run"):
                try:
                    done(futures[future], future.result())
                except Exception as exc:  # noqa: BLE001 (reported below, after the other runs end)
                    failures.append((futures[future], exc))
                    print(f"{desc}: run {futures[future]!r} failed: {exc!r}", file=sys.stderr)
    if failures:
        where = f"; the {len(results)} finished are in {keep}, and the same command reruns only the rest" if keep else ""
        raise RuntimeError(f"{len(failures)} of {len(items)} run(s) failed, first {failures[0][0]!r}{where}") \
            from failures[0][1]
    return [results[_item_key(item)] for item in items]


def _item_key(item: Any) -> str:
    """An item as ``keep`` stores it (tuples become lists in JSON)."""
    return json.dumps(json.loads(json.dumps(item)))
