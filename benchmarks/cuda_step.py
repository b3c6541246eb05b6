"""Time one training step per block on a GPU: the portable graph on onnxruntime's CUDA execution provider
(``PortableRunner(provider="cuda")``, what a Jetson runs with NVIDIA's onnxruntime-gpu) against torch eager on
CUDA; and check that a few steps on the GPU train the weights the CPU provider trains.

For every block of each model (method bwbpf, ``--blocks`` blocks), both runtimes take the same step at the
same batch size: the batch comes from host memory, then forward, local cross-entropy, backward and an AdamW
update, and the step's outputs (loss, logits, outgoing message) go back to host memory, as the runtime hands
them to the next block. The weights and the optimizer state stay on the GPU between steps in both. Steps are
timed in rounds, the runtimes taking turns (``step_speed.time_interleaved``); each ratio is the median over
the rounds; each runtime in its libraries' default math (cuDNN may pick TF32 convolutions, torch's default
and onnxruntime's CUDA provider's too). Then ``--check-steps`` steps on the CUDA provider in fp32 math and on
the CPU provider, from the same state and batch, are compared: the first step's outputs, the parameters and the
BatchNorm statistics afterwards (see ``Parity``).

    python benchmarks/cuda_step.py                      # cnn-small and resnet18, K=4, batch 64, on the GPU
    python benchmarks/cuda_step.py --runs DIR           # time runs exported earlier (DIR/<model>), not re-exported
    python benchmarks/cuda_step.py --provider cpu --device cpu --models cnn-small --repeats 2   # rehearsal, CPU

Needs onnxruntime-gpu (``PortableRunner`` on ``CUDAExecutionProvider``) and torch with CUDA. A run in
``--runs`` may come without its ``portable_state.npz`` files (the blocks' initial weights, the largest files
of an export): they are rebuilt from the seed, as the export wrote them. Without ``--runs`` the models are
exported first, which needs the host's training build. Writes benchmarks/results/cuda_step.json and .md
(``--name`` changes the stem; a path is written as given).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import describe_machine, machine_info, markdown_table, write_results
from edgebll.export import MODELS, OptimizerConfig, build_blocks, build_model, export_model
from edgebll.export.portable import initial_state
from edgebll.manifest import load_block_manifest
from edgebll.portable import PortableRunner, save_state
from edgebll.portable_schema import STATE_FILE
from edgebll.run_folder import block_dir_name
from step_speed import Timing, round_ratio, time_interleaved, torch_step

METHOD = "bwbpf"
PACKAGES = ("numpy", "torch", "onnxruntime", "onnxruntime-gpu")


@dataclass(kw_only=True, slots=True)
class Row:
    """One model / block."""

    model: str
    block: int
    units: list[str]
    params: int
    input_shape: list[int]
    batch_size: int
    repeats: int
    portable_ms: float
    portable_iqr_ms: float
    torch_ms: float
    torch_iqr_ms: float
    portable_over_torch: float
    """Median over the rounds of the portable step's time over torch's in the same round."""
    portable_steps_ms: list[float]
    torch_steps_ms: list[float]
    check_steps: int
    parity: Parity | None
    """``check_steps`` steps on the provider against the CPU provider (None: not checked)."""


def ensure_state(block_dir: Path, block: torch.nn.Module) -> None:
    """Write ``block_dir``'s initial state from ``block`` where the file is missing (the runners here do not
    check the manifest's hashes: a carried run may lack files that only the training build reads)."""
    if not (block_dir / STATE_FILE).is_file():
        optimizer = OptimizerConfig(name=load_block_manifest(block_dir, verify_files=False).optimizer["type"])
        state, moments = initial_state(block, optimizer)  # the moments' keys: only the optimizer's name matters
        save_state(block_dir / STATE_FILE, {**state, **moments})


@dataclass(kw_only=True, slots=True)
class Parity:
    """The provider's steps against the CPU provider's, from the same state and batch."""

    output_diff: float
    """First step, before any update: largest |a - b| over loss, logits and message, over the largest |b|."""
    params_beyond: float
    """Fraction of the parameters' elements more than 1e-5 apart after the steps (AdamW's first steps move an
    element by about lr whatever its gradient's size, so a near-zero gradient whose sign the rounding flips
    puts that element 2 lr apart)."""
    params_max_over_lr: float
    """Largest parameter difference after the steps, in units of lr."""
    buffers_diff: float
    """Largest difference of the BatchNorm statistics after the steps, over their largest magnitude."""


CUDA_FP32 = {"use_tf32": "0"}
"""onnxruntime's CUDA provider in fp32 math, for the parity check (TF32 convolutions round at 1e-3)."""


def parity(block_dir: Path, x: np.ndarray, labels: np.ndarray, *, provider: str, steps: int, lr: float) -> Parity:
    """``steps`` steps on ``provider`` (fp32 math) and on the CPU provider, both from the block's exported state."""
    options = CUDA_FP32 if provider == "cuda" else None
    runners = [PortableRunner(block_dir, provider=provider, provider_options=options, load_trained=False,
                              verify_files=False, threads=0),
               PortableRunner(block_dir, provider="cpu", load_trained=False, verify_files=False, threads=0)]
    results = [[r.train_step(x, labels, lr) for _ in range(steps)] for r in runners]
    first = [[np.asarray(v.loss), v.logits] + ([v.message] if v.message is not None else [])
             for v in (results[0][0], results[1][0])]
    output_diff = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                      for a, b in zip(*first))
    states = [r.state_arrays() for r in runners]
    params = [k for k in runners[1].schema.state_keys() if k.startswith("param:")]
    buffers = [k for k in runners[1].schema.model_keys() if not k.startswith("param:")]
    apart = [np.abs(states[0][k] - states[1][k]) for k in params]
    beyond = sum(int(np.count_nonzero(a > 1e-5)) for a in apart) / max(sum(a.size for a in apart), 1)
    scale = max((float(np.max(np.abs(states[1][k]))) for k in buffers if states[1][k].size), default=1.0)
    buffers_diff = max((float(np.max(np.abs(states[0][k] - states[1][k]))) for k in buffers if states[1][k].size),
                       default=0.0)
    return Parity(output_diff=output_diff, params_beyond=beyond,
                  params_max_over_lr=max(float(np.max(a)) for a in apart) / lr,
                  buffers_diff=buffers_diff / max(scale, 1e-30))


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def benchmark_model(name: str, args: argparse.Namespace, workdir: Path, progress: tqdm,
                    failures: list[str]) -> list[Row]:
    """Check and time every block of ``name`` (exported, or found in ``--runs``) on both runtimes; a block that
    fails is appended to ``failures`` with its error, and the others go on."""
    run_dir = args.runs / name if args.runs else None
    if run_dir is None or not run_dir.is_dir():
        if run_dir is not None:
            raise SystemExit(f"cuda_step: {run_dir} does not exist; hint: export {name} into it with "
                             f"`edgebll export --model {name} --blocks {args.blocks} --out {run_dir}`, or drop --runs")
        progress.set_postfix_str(f"exporting {name}")
        run_dir = export_model(name, out=workdir / name, method=METHOD, blocks=args.blocks,
                               batch_size=args.batch_size, seed=args.seed, lr=args.lr, progress=False)
    torch.manual_seed(args.seed)  # export_model seeds the same way: these blocks hold the exported weights
    spec = build_model(name)
    blocks, input_shapes, groups = build_blocks(spec, METHOD, args.blocks)
    rng = np.random.default_rng(args.seed)
    rows = []
    for k, (block, input_shape, group) in enumerate(zip(blocks, input_shapes, groups)):
        block_dir = run_dir / block_dir_name(k)
        ensure_state(block_dir, block)  # before the block moves to the GPU and trains
        x = rng.standard_normal((args.batch_size, *input_shape), dtype=np.float32)
        labels = rng.integers(0, spec.num_classes, size=args.batch_size, dtype=np.int64)
        try:
            progress.set_postfix_str(f"{name} block {k}: parity")
            checked = parity(block_dir, x, labels, provider=args.provider, steps=args.check_steps,
                             lr=args.lr) if args.check_steps else None
            progress.set_postfix_str(f"{name} block {k}: timing")
            portable = PortableRunner(block_dir, provider=args.provider, load_trained=False, verify_files=False)
            steps = {"portable": lambda: portable.train_step(x, labels, args.lr),
                     "torch": torch_step(block, x, labels, lr=args.lr, device=args.device)}
            timed: dict[str, Timing] = time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
        except Exception as exc:  # onnxruntime's errors: every block is tried, the failures reported together
            failures.append(f"{name} block {k}: {type(exc).__name__}: {exc}")
            tqdm.write(failures[-1])
            progress.update()
            continue
        finally:
            block.cpu()
        mine, eager = timed["portable"], timed["torch"]
        del portable, steps
        rows.append(Row(model=name, block=k, units=[spec.unit_names[u] for u in group],
                        params=sum(p.numel() for p in block.parameters()), input_shape=list(input_shape),
                        batch_size=args.batch_size, repeats=args.repeats,
                        portable_ms=_ms(mine.median_s), portable_iqr_ms=_ms(mine.iqr_s),
                        torch_ms=_ms(eager.median_s), torch_iqr_ms=_ms(eager.iqr_s),
                        portable_over_torch=round_ratio(mine, eager),
                        portable_steps_ms=[_ms(t) for t in mine.steps_s],
                        torch_steps_ms=[_ms(t) for t in eager.steps_s], check_steps=args.check_steps,
                        parity=checked))
        progress.update()
    return rows


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def _parity_cells(check: Parity | None) -> list[str]:
    if check is None:
        return ["—"] * 4
    return [f"{check.output_diff:.1e}", f"{100 * check.params_beyond:.3f} %", f"{check.params_max_over_lr:.2f}",
            f"{check.buffers_diff:.1e}"]


def render_markdown(rows: list[Row], failures: list[str], machine: dict, settings: dict) -> str:
    table = markdown_table(
        ["model", "block", "params", "input shape", "portable ms", "torch ms", "portable/torch",
         "outputs, step 1", "params > 1e-5 apart", "largest param diff / lr", "BatchNorm stats"],
        [[r.model, r.block, f"{r.params:,}", "×".join(map(str, r.input_shape)),
          f"{r.portable_ms:.2f} ± {r.portable_iqr_ms:.2f}", f"{r.torch_ms:.2f} ± {r.torch_iqr_ms:.2f}",
          f"{r.portable_over_torch:.2f}", *_parity_cells(r.parity)] for r in rows],
        align="lrrlrrrrrrr")
    ratios = [r.portable_over_torch for r in rows] or [float("nan")]
    failed = ("\n\nFailed on the provider:\n\n" + "".join(f"- {f}\n" for f in failures)) if failures else ""
    return (
        "# Training step time per block on a GPU: the portable graph on onnxruntime's "
        f"{settings['provider']} provider against torch eager\n\n"
        f"`{machine['command']}` on {settings['device_name']} ({describe_machine(machine)}).\n\n"
        f"One training step (batch from host memory, forward, local cross-entropy, backward, AdamW, outputs back to "
        f"host memory) of each block of a {settings['blocks']}-block `{METHOD}` split, batch {settings['batch_size']}; "
        f"median ± inter-quartile range of {settings['repeats']} timed steps after {settings['warmup']} warm-up "
        "steps, the two runtimes taking turns, each in its default math (TF32 convolutions where cuDNN picks them); "
        f"the ratio is the median over the rounds. portable/torch: {min(ratios):.2f}–{max(ratios):.2f}× over the "
        f"blocks; {settings['total_seconds']:.0f} s in all.\n\n"
        f"The last four columns compare {settings['check_steps']} AdamW steps (lr {settings['lr']:g}) on the "
        f"{settings['provider']} provider in fp32 math (`use_tf32` 0) with the same steps on onnxruntime's CPU "
        "provider, from the same state and batch: the first step's loss, logits and message (largest difference over "
        "the largest magnitude); the share of parameter elements more than 1e-5 apart afterwards and the largest "
        "difference in units of lr (AdamW's first steps move every element by about lr, so a near-zero gradient whose "
        "sign the rounding flips leaves that element up to 2 lr apart per step); the BatchNorm running statistics "
        "(largest difference over the largest magnitude).\n\n" + table + failed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step time per block of the portable graph on onnxruntime's CUDA provider against torch eager on "
                    "CUDA, and the weights a few GPU steps train against the CPU provider's. Writes "
                    "benchmarks/results/<name>.json and <name>.md.")
    default = " (default: %(default)s)"
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn-small", "resnet18"],
                        help="zoo models to time" + default)
    parser.add_argument("--runs", type=Path, default=None,
                        help="folder holding runs exported earlier as <model>/ (default: export into a temporary "
                             "folder, which needs the training build)")
    parser.add_argument("--blocks", type=int, default=4, help="number of blocks each model is split into" + default)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per training step" + default)
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"),
                        help="onnxruntime execution provider of the portable runner" + default)
    parser.add_argument("--device", default="cuda", help="torch device" + default)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones" + default)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per runtime and block" + default)
    parser.add_argument("--check-steps", type=int, default=4,
                        help="steps on the provider and on the CPU compared afterwards (0: no check)" + default)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate" + default)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random batches" + default)
    parser.add_argument("--name", default="cuda_step",
                        help="results file stem: writes benchmarks/results/<name>.json and <name>.md" + default)
    args = parser.parse_args(argv)
    for option, least in (("blocks", 1), ("warmup", 0), ("repeats", 1), ("check_steps", 0)):
        if getattr(args, option) < least:
            parser.error(f"--{option.replace('_', '-')} must be at least {least}, got {getattr(args, option)}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (BatchNorm needs a batch), got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no GPU; hint: run on a GPU machine, or rehearse with "
                     "--provider cpu --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.provider == "cuda":
        import onnxruntime

        # onnxruntime-gpu >= 1.21 loads the CUDA and cuDNN libraries of the nvidia-* wheels (torch's) itself
        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()
    machine = machine_info(PACKAGES)
    started = time.perf_counter()
    rows: list[Row] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgebll-cuda-step-") as tmp, \
            tqdm(total=args.blocks * len(args.models), desc="cuda step", unit="block", file=sys.stdout) as progress:
        for name in args.models:
            new = benchmark_model(name, args, Path(tmp), progress, failures)
            rows += new
            for row in new:  # printed as they come: a run cut short keeps them in its log
                tqdm.write(f"{row.model} block {row.block}: portable {row.portable_ms:.2f} ms, torch "
                           f"{row.torch_ms:.2f} ms, ratio {row.portable_over_torch:.2f}; vs CPU {row.parity}")
    settings = {"method": METHOD, "blocks": args.blocks, "batch_size": args.batch_size, "provider": args.provider,
                "device": args.device, "device_name": _device_name(args.device), "warmup": args.warmup,
                "repeats": args.repeats, "check_steps": args.check_steps, "lr": args.lr, "seed": args.seed,
                "cpu_threads_for_check": os.cpu_count(),
                "median_ratio": round(statistics.median(r.portable_over_torch for r in rows), 3) if rows else None,
                "total_seconds": round(time.perf_counter() - started, 1)}
    data = {"benchmark": "cuda_step", "machine": machine, "settings": settings, "rows": [asdict(r) for r in rows],
            "failures": failures}
    json_path, md_path = write_results(args.name, data, render_markdown(rows, failures, machine, settings))
    print(f"wrote {json_path} and {md_path} in {settings['total_seconds']:.0f} s")
    if failures:
        sys.exit(f"cuda_step: {len(failures)} block(s) failed on the {args.provider} provider:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
