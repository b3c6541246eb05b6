"""What each ``edgebll`` command does, once :mod:`edgebll.cli` has parsed its options.

Host commands (export, export-inference, demo) import the exporter, and with it torch and onnx,
only when they run: the device commands (train, worker, eval, profile, devices, data) never load
them. The device profiles (``edgebll.devices``) are imported by the commands that use them too:
that package is the repository's ``devices/`` folder, mapped into ``edgebll`` only by an install
(pyproject.toml's ``wheel.packages``), and a board that runs edgebll from a checkout on PYTHONPATH
trains without it (tests/test_board_env.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebll.checkpoints import read_progress
from edgebll.data_import import import_any
from edgebll.dataset_folder import read_dataset_info
from edgebll.errors import EdgeBLLError
from edgebll.launch import run_worker, train_mpi
from edgebll.options import from_args
from edgebll.profile_report import format_profile_table
from edgebll.profiler import PROFILE_NAME, profile_run, this_machine
from edgebll.run_data import is_dataset_folder
from edgebll.runtime import Runtime
from edgebll.train_config import TrainConfig, WorkerConfig

if TYPE_CHECKING:
    from edgebll.devices.profiles import DeviceProfile


def _load_exporter() -> Any:
    try:  # torch and onnx: host only, so imported when a host command runs
        from edgebll import export
    except ImportError as exc:
        raise EdgeBLLError(f"exporting needs torch and onnx ({exc}); hint: pip install 'edgebll[export]' "
                           "(on the CI machines: pip install torch==2.13.0 first)") from exc
    return export


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed options of ``train``, ``worker`` or ``demo`` describe."""
    return from_args(TrainConfig, args)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig that the parsed options of ``train`` or ``worker`` describe."""
    return from_args(WorkerConfig, args)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _devices(args: argparse.Namespace) -> list[DeviceProfile]:
    """The boards of --device (comma-separated names or TOML paths) or --budget; empty when neither is given."""
    from edgebll.devices.profiles import custom_profile, load_profile  # only where installed (see above)

    if args.device and args.budget:
        raise EdgeBLLError("give --device or --budget, not both")
    if args.device:
        return [load_profile(name) for name in args.device.split(",")]
    return [custom_profile(args.budget)] if args.budget else []


def _check_export_fit(out: Path, devices: list[DeviceProfile], batch_size: int) -> None:
    """Print every block's estimate against its board; refuse (and remove the run) if one does not fit."""
    from edgebll.export.fit import check_fit, fit_table, refuse_misfits  # host only (torch)

    fits = check_fit(out, devices)
    print(fit_table(fits))
    try:
        refuse_misfits(fits, batch_size)
    except EdgeBLLError:
        shutil.rmtree(out)
        raise


def _print_auto_partition(chosen: Any, model: str, method: str) -> None:
    """What --blocks auto chose: the blocks, which board takes each, the slowest block, unused boards."""
    from edgebll.export.fit import fit_table  # host only (torch)

    listed = len(chosen.boards) > 1
    print(f"exported {chosen.split.num_blocks} block(s) of {model} ({method}) to {chosen.run_dir}: the fewest that fit"
          f"{', each on its own board of --device' if listed else ''}; slowest block "
          f"{chosen.split.max_cost / 1e6:.1f} M MACs per sample (head included); "
          f"{chosen.ranges_estimated} unit ranges estimated in {chosen.search_seconds:.0f} s")
    print(fit_table(chosen.fits, list(chosen.split.boards) if listed else None))
    unused = chosen.unused_boards()
    if unused:
        print("unused boards: " + ", ".join(f"{chosen.boards[i].name} (#{i + 1})" for i in unused))


def _print_table(train: dict[str, Any], evaluation: dict[str, Any]) -> None:
    last = train["epochs"][-1] if train.get("epochs") else {"accuracy": [float("nan")] * evaluation["blocks"]}
    print(f"\n{evaluation['model']} · {evaluation['method']} · {evaluation['blocks']} blocks · {train['codec']} messages")
    print(f"{'block':>5}  {'train acc':>9}  {'test acc':>8}  {'bytes/step sent':>15}")
    sent = train.get("message_bytes_per_step", [])
    for k, acc in enumerate(evaluation["per_block_accuracy"]):
        out = f"{sent[k]:>15,.0f}" if k < len(sent) else f"{'—':>15}"
        print(f"{k:>5}  {last['accuracy'][k]:>9.4f}  {acc:>8.4f}  {out}")
    print(f"test accuracy {evaluation['test_accuracy']:.4f} on {evaluation['samples']} images · "
          f"train {train['seconds']:.0f} s ({train['samples_per_s']:.0f} samples/s) · "
          f"messages {train['message_bytes_per_sample']:,.0f} B/sample")


def data_command(args: argparse.Namespace) -> int:
    """``edgebll data import``: write a dataset folder."""
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise EdgeBLLError(f"--size takes HxW in pixels, e.g. 32x32; got {args.size!r}")
    out = import_any(args.train, args.out, test=args.test, name=args.name, classes=classes, size=size,
                     channels=args.channels, overwrite=args.overwrite)
    info = read_dataset_info(out)
    print(f"wrote {out}: {info.name}, {info.counts['train']} train / {info.counts['test']} test samples of "
          f"{info.dtype} {list(info.sample_shape)}, {info.num_classes} classes; export with --data {out}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``edgebll export``: a model's blocks as artifact folders, checked against --device when given."""
    export = _load_exporter()
    progress = _progress(args)
    lr = args.lr if args.lr is not None else (2e-3 if args.optimizer == "adamw" else 0.05)
    options = dict(method=args.method, batch_size=args.batch_size, head=args.head, latent=args.latent,
                   optimizer=export.OptimizerConfig(name=args.optimizer, weight_decay=args.weight_decay), lr=lr,
                   seed=args.seed, overwrite=args.overwrite, portable=args.portable,
                   predsim=export.PredSimConfig(beta=args.predsim_beta, max_features=args.predsim_features))
    if args.data_dir is not None:
        if not is_dataset_folder(args.data_dir):
            raise EdgeBLLError(f"export --data {args.data_dir}: not a dataset folder (no dataset.json); hint: write "
                               "one with `edgebll data import`; Fashion-MNIST needs no --data at export")
        options["data"] = args.data_dir
    if args.init_from is not None:
        options["init_from"] = args.init_from
    devices = _devices(args)
    if devices:
        from edgebll.export.fit import require_portable_graphs  # host only (torch)

        require_portable_graphs(devices, args.portable)
    if args.blocks == "auto":
        if not devices:
            raise EdgeBLLError("--blocks auto needs the board(s) to fit: --device NAME or --budget SIZE")
        from edgebll.export.fit import export_to_fit  # host only (torch)

        chosen = export_to_fit(args.model, out=args.out, devices=devices, progress=progress, **options)
        _print_auto_partition(chosen, args.model, args.method)
        return 0
    out = export.export_model(args.model, out=args.out, blocks=args.blocks, progress=progress, **options)
    print(f"exported {args.blocks} block(s) of {args.model} ({args.method}) to {out}")
    if devices:
        _check_export_fit(out, devices, args.batch_size)
    return 0


def export_inference_command(args: argparse.Namespace) -> int:
    """``edgebll export-inference``: one ONNX model of the trained forward chain."""
    _load_exporter()
    from edgebll.export.inference import chain_inference_model  # host only (onnx)

    out = chain_inference_model(args.run, args.out, all_heads=args.all_heads, threads=args.threads)
    progress = read_progress(Path(args.run))
    weights = f"the weights of step {progress['step']}" if progress else "the latest weights"
    print(f"wrote {out}: x -> logits{' and every block head' if args.all_heads else ''}, {weights}")
    return 0


def _refuse_resume_and_restart(args: argparse.Namespace) -> None:
    if args.resume and args.restart:
        raise EdgeBLLError("--resume and --restart contradict each other; choose one")


def worker_command(args: argparse.Namespace) -> int:
    """``edgebll worker``: this MPI rank's block."""
    _refuse_resume_and_restart(args)
    return run_worker(args.run, train_config(args), worker_config(args), threads=args.threads,
                      data_dir=args.data_dir, restart=args.restart, progress=_progress(args), backend=args.backend,
                      provider=args.provider)


def train_command(args: argparse.Namespace) -> int:
    """``edgebll train``: every block in this process, or one MPI rank per block (``--transport mpi``)."""
    _refuse_resume_and_restart(args)
    progress = _progress(args)
    if args.transport == "mpi":
        train_mpi(args.run, train_config(args), worker_config(args), ranks=args.ranks, threads=args.threads,
                  data_dir=args.data_dir, restart=args.restart, progress=progress, hosts=args.hosts,
                  backend=args.backend, provider=args.provider)
        return 0
    if args.ranks is not None or args.hosts is not None:
        raise EdgeBLLError(f"{'-n/--ranks' if args.ranks is not None else '--hosts'} needs --transport mpi")
    config = train_config(args)
    runtime = Runtime.from_run(args.run, threads=args.threads, load_trained=not args.restart,
                               backend=args.backend, provider=args.provider, freeze_blocks=config.freeze_blocks)
    summary = runtime.train(config, data_dir=args.data_dir, progress=progress)
    last = summary["epochs"][-1]
    print(f"trained {summary['steps']} steps · train accuracy per block {last['accuracy']} · "
          f"{summary['samples_per_s']} samples/s · wrote {Path(args.run) / 'train.json'}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """``edgebll eval``: test accuracy of every block's head."""
    runtime = Runtime.from_run(args.run, threads=args.threads, backend=args.backend, provider=args.provider)
    summary = runtime.evaluate(data_dir=args.data_dir, limit=args.limit, codec=args.codec,
                               batch_size=args.batch_size, progress=_progress(args))
    print(json.dumps(summary, indent=1))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``edgebll demo``: export, train and evaluate, with a summary table."""
    export = _load_exporter()
    progress = _progress(args)
    began = time.perf_counter()
    export.export_model(args.model, out=args.out, method="bwbpf", blocks=args.blocks, batch_size=args.batch_size,
                        head=args.head, lr=2e-3, overwrite=True, progress=progress,
                        portable=args.backend == "portable")  # the demo trains here: other graphs would idle
    runtime = Runtime.from_run(args.out, threads=args.threads, backend=args.backend, provider=args.provider)
    train = runtime.train(train_config(args), data_dir=args.data_dir, progress=progress)
    evaluation = runtime.evaluate(data_dir=args.data_dir, progress=progress)
    _print_table(train, evaluation)
    print(f"total {time.perf_counter() - began:.0f} s · results in {args.out}/train.json and {args.out}/eval.json")
    return 0


def devices_command(args: argparse.Namespace) -> int:
    """``edgebll devices``: the shipped device profiles, as a table or JSON."""
    from edgebll.devices.profiles import format_bytes, list_profiles  # only where installed (see above)

    profiles = list_profiles()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=1))
        return 0
    print(f"{'name':<21} {'RAM':>9} {'budget':>10} {'cores':>5}  {'arch':<8} link")
    for p in profiles:
        link = f"{p.link[0]} {p.link[1] * 8 / 1e6:.0f} Mbit/s" if p.link else "—"
        print(f"{p.name:<21} {format_bytes(p.ram_bytes):>9} {format_bytes(p.budget_bytes):>10} {p.cores:>5}  "
              f"{p.arch:<8} {link}")
    return 0


def profile_command(args: argparse.Namespace) -> int:
    """``edgebll profile``: measure every block against a device; exit 1 when one does not fit."""
    from edgebll.devices.profiles import load_profile  # only where installed (see above)

    if args.device and args.budget:
        raise EdgeBLLError("--device and --budget contradict each other; choose one")
    device = load_profile(args.device) if args.device else this_machine(args.budget, args.cores)
    profile = profile_run(args.run, device, steps=args.steps, threads=args.threads, codec=args.codec,
                          batch_size=args.batch_size, bp_run=args.bp_run, enforce_budget=args.enforce_budget,
                          plot=not args.no_plot, progress=not args.no_progress, backend=args.backend,
                          freeze_blocks=args.freeze_blocks)
    if args.json:
        print(json.dumps(profile, indent=1))
        return 0
    print(format_profile_table(profile))
    written = [str(Path(args.run) / PROFILE_NAME)] + ([profile["plot"]] if profile.get("plot") else [])
    if not args.no_plot and not profile.get("plot"):
        written.append("(no plot: pip install 'edgebll[plot]')")
    print("wrote " + ", ".join(written))
    return 0 if profile["fits"] else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": export_command, "train": train_command, "worker": worker_command, "eval": eval_command,
    "export-inference": export_inference_command, "demo": demo_command, "data": data_command,
    "devices": devices_command, "profile": profile_command,
}
"""Each command of :func:`edgebll.cli.build_parser`, by name: its options in, its exit status out."""
