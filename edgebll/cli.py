"""``edgebll`` command line: the options of every command, and the entry point.

Host commands (export, demo) need the ``export`` extra (torch, onnx); train and eval need only
numpy and onnxruntime (``--backend``: the training build, or the portable graphs on plain
onnxruntime), as on a board. What each command does: :mod:`edgebll.commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edgebll import __version__
from edgebll.backends import add_backend_options, block_list
from edgebll.commands import COMMANDS
from edgebll.errors import EdgeBLLError
from edgebll.options import add_options
from edgebll.train_config import TrainConfig, WorkerConfig

DEMO_EXAMPLE = """\
examples:
  edgebll export --model cnn-small --method bwbpf --blocks 4 --batch-size 64 --out runs/a
  edgebll train runs/a --epochs 1 --codec int8
  edgebll eval runs/a
  edgebll demo                      # all three on Fashion-MNIST, with a summary table
"""

WORKER_EXAMPLE = """\
examples:
  mpiexec -n 4 edgebll worker runs/a --epochs 1       # 4 ranks on this host, rank k trains block k
  edgebll train runs/a --transport mpi -n 4            # the same, started for you (one rank per core)
  edgebll train runs/a --transport mpi --hosts hosts   # one rank per board; hosts lists one board per line
  mpiexec -f hosts -n 4 edgebll worker runs/a          # the same, started by hand
"""


def _blocks_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {text!r}") from None


def _add_train_options(p: argparse.ArgumentParser, *, resume: bool = True) -> None:
    add_options(p, TrainConfig, skip=() if resume else ("resume",))


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    add_options(p, WorkerConfig)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "--data-dir", dest="data_dir", default=None, metavar="DIR",
                   help="where the data lives: a dataset folder written by `edgebll data import` (export: train on "
                   "it; train/eval: read it instead of the one run.json names), or the folder with the four "
                   "Fashion-MNIST IDX files (default: the run's dataset folder, else $EDGEBLL_DATA_DIR or "
                   "/usr/share/datasets/fashion-mnist); the transformer's sequence task is synthetic and needs none")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per block (default: 0 = ORT decides; "
                   "1 per rank with --transport mpi, which binds each rank to a core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_backend_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebll", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEMO_EXAMPLE,
        description="Block-local training on edge devices: export a model as one ONNX Runtime training artifact "
                    "per block, train the blocks with local losses and quantized messages, evaluate.")
    parser.add_argument("--version", action="version", version=f"edgebll {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a model's blocks as ORT training artifacts (host, needs torch)",
                       description="Partition a model into blocks, attach each block's local loss, and write one "
                                   "artifact folder per block plus run.json under --out.")
    p.add_argument("--model", default="cnn-small",
                   help="model zoo name: cnn-small, resnet18 or vgg8b (Fashion-MNIST), or transformer (20 one-head "
                        "layers on the sequence task: reverse a permutation of 0..9, per-token accuracy) "
                        "(default: cnn-small)")
    p.add_argument("--method", default="bwbpf", choices=("bwbpf", "bll", "bp", "predsim"),
                   help="bwbpf: a local head and cross-entropy per block; bll: block-local learning with a "
                        "feedback twin network (Kappel et al. 2023); bp: the whole model as one block; predsim: "
                        "prediction + similarity local losses (Nokland & Eidnes 2019) (default: bwbpf)")
    p.add_argument("--blocks", type=_blocks_arg, default=4,
                   help="number of blocks K (default: 4; bp needs 1), or auto: the fewest blocks that each fit "
                        "--device/--budget, boundaries chosen so the slowest block is fastest; with a list of "
                        "boards each takes at most one block, in whatever order fits")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--head", choices=("conv", "linear", "mlp"), default="conv",
                   help="local head of all but the last block (bwbpf, bll; predsim has its own): conv = stride-2 "
                        "conv + pool + linear, "
                        "linear = pool + linear, mlp = stride-2 conv + pool + 128-unit hidden layer + linear; a head "
                        "that would cost more than its block gets its input average-pooled (default: conv; +4.5 "
                        "points on cnn-small, see README)")
    p.add_argument("--latent", choices=("categorical", "bernoulli"), default="categorical",
                   help="bll: distribution of each block's latent, one unit per class (default: categorical; "
                        "see README)")
    p.add_argument("--predsim-beta", type=float, default=0.99, metavar="BETA",
                   help="predsim: local loss (1-BETA)*prediction + BETA*similarity (default: 0.99, the paper's)")
    p.add_argument("--predsim-features", type=int, default=2048, metavar="N",
                   help="predsim: the prediction term average-pools the activation to at most N features "
                        "(default: 2048)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="(default: adamw, torch's formula)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--lr", type=float, default=None, help="default learning rate stored for train "
                   "(default: 2e-3 for adamw, 0.05 for sgd)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--data", dest="data_dir", default=None, metavar="DIR",
                   help="a dataset folder (`edgebll data import`) to train on: the samples' shape and the classes "
                        "come from it (default: Fashion-MNIST, or the model's own task)")
    p.add_argument("--init-from", default=None, metavar="SRC",
                   help="start from pretrained weights: a trained edgebll run of the same model (units by name; a "
                        "block with the same units also gets its head), a torch state_dict file of "
                        "nn.Sequential(*units), or an ONNX model of it with BatchNorm unfolded (torch.onnx.export(units, "
                        "..., optimize=False))")
    p.add_argument("--device", default=None, metavar="NAME[,NAME...]",
                   help="board(s) the blocks must fit (`edgebll devices` lists them; a mixed set: one per block in "
                        "order with --blocks K, or with --blocks auto a pool where each board takes at most one block): "
                        "prints each block's estimated peak memory and refuses a block that does not fit")
    p.add_argument("--budget", default=None, help="instead of --device: a custom board's training budget, e.g. 300MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--portable", action=argparse.BooleanOptionalAction, default=True,
                   help="also write each block's portable training step (standard ONNX ops, for boards with plain "
                        "onnxruntime: `--backend portable`); --no-portable exports faster (default: --portable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train every block of a run with its local loss",
                       description="Train the blocks of RUN in one process; every activation passes through the "
                                   "message codec. Writes RUN/train.json and RUN/block-*/trained/checkpoint.")
    p.add_argument("run", help="run folder written by `edgebll export`")
    _add_train_options(p)
    p.add_argument("--restart", action="store_true", help="start over from the exported weights")
    p.add_argument("--transport", choices=("inprocess", "mpi"), default="inprocess",
                   help="inprocess: every block in this process, one after another (default); mpi: one rank per "
                        "block, pipelined, on this host or the boards of --hosts")
    p.add_argument("-n", "--ranks", type=int, default=None, metavar="N",
                   help="mpi: number of ranks (default and only choice: the run's number of blocks)")
    p.add_argument("--hosts", default=None, metavar="FILE",
                   help="mpi: run the ranks on the boards of FILE, one `host` or `host:slots` per line (MPICH's "
                        "hosts file; rank 0, on the first board, reads the data and writes train.json); every "
                        "board needs edgebll and the run folder at the same path (default: this host)")
    _add_worker_options(p)
    _add_common(p)

    p = sub.add_parser("worker", help="one rank of an MPI run: trains block RANK (start it with mpiexec)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=WORKER_EXAMPLE,
                       description="Train block k on MPI rank k: activations go up and BLL's feedback messages go "
                                   "down as codec frames, pipelined, with bounded messages in flight. Rank 0 reads "
                                   "the data and writes RUN/train.json and RUN/progress.json (the last step every "
                                   "rank has checkpointed; --resume restarts there).")
    p.add_argument("run", help="run folder written by `edgebll export` (on every board, at the same path)")
    _add_train_options(p)
    p.add_argument("--restart", action="store_true", help="start over from the exported weights")
    _add_worker_options(p)
    _add_common(p)

    p = sub.add_parser("eval", help="test accuracy of every block's head; writes RUN/eval.json",
                       description="Evaluate RUN on its test set (the 10,000 Fashion-MNIST test images, or the "
                                   "sequence task's unseen sequences, accuracy per token) through the eval graphs, "
                                   "messages through the codec the run was trained with.")
    p.add_argument("run", help="run folder")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate on the first N test samples only")
    p.add_argument("--codec", default=None, help="message codec (default: the one used in training)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images (or sequences) per eval step (default: the run's training batch size, which "
                        "the memory profile covers; larger batches need more memory on the device)")
    _add_common(p)

    p = sub.add_parser("export-inference", help="one deployable ONNX model of a trained run's forward chain (host)",
                       description="Merge every block's trained forward graph into one inference model: input x, "
                                   "output logits (the last block's). BLL's feedback blocks are left out: they "
                                   "are not needed at test time. Needs onnx.")
    p.add_argument("run", help="run folder (trained or not)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--all-heads", action="store_true", help="also output logits_k of every block's local head")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: 0 = ORT decides)")

    p = sub.add_parser("demo", help="export cnn-small in 4 BWBPF blocks, train 1 epoch with int8 messages, evaluate",
                       description="The main job end to end on Fashion-MNIST, with a summary table.")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo, replaced)")
    p.add_argument("--model", default="cnn-small", help="(default: cnn-small)")
    p.add_argument("--blocks", type=int, default=4, help="(default: 4)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--head", choices=("conv", "linear", "mlp"), default="conv", help="(default: conv)")
    _add_train_options(p, resume=False)
    _add_common(p)

    p = sub.add_parser("data", help="turn your own data into a dataset folder (edgebll data import)",
                       description="Dataset folders hold raw arrays a board memory-maps and dataset.json (shape, "
                                   "classes, normalisation, sha256). Export with --data DIR to train on one.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("import", help="write a dataset folder from .npz files, IDX files or folders of images",
                            description="Write a dataset folder from SOURCE: TRAIN.npz with --test TEST.npz, each "
                                        "holding x (the samples [N, ...]: uint8 or float32 images or windows, or int64 "
                                        "token ids) and y (integer labels [N], or [N, T] per token): np.savez(f, x=x, "
                                        "y=y); or a folder of MNIST-style IDX files (both splits); or a folder with one "
                                        "sub-folder of images per class, with --test DIR (images need Pillow).")
    q.add_argument("train", metavar="SOURCE", help="TRAIN.npz, a folder of IDX files, or a folder of class sub-folders")
    q.add_argument("--test", default=None, help="TEST.npz, or the test images' folder (not for IDX files)")
    q.add_argument("--size", default=None, metavar="HxW", help="images: resize every image to H x W pixels (default: "
                   "the first training image's size)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="images: 1 grayscale or 3 RGB (default: 1 if the first image is grayscale, else 3)")
    q.add_argument("--out", required=True, help="the dataset folder to write")
    q.add_argument("--name", default=None, help="the dataset's name (default: the folder's name)")
    q.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class names, comma-separated (default: 0..max label)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("devices", help="list the device profiles (RAM, training budget, cores, link)",
                       description="The shipped device profiles (devices/boards/*.toml).")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("profile", help="measure each block's peak memory and step time vs the estimate and a device",
                       description="Train every block of RUN for a few steps, each in a fresh process, and measure its "
                                   "peak resident memory above an idle runtime; compare with the estimate and the "
                                   "device's budget. With --device of an aarch64 board, --backend auto measures the "
                                   "portable graphs, which that board trains with. Writes RUN/profile.json and "
                                   "RUN/profile.png.")
    p.add_argument("run", help="run folder written by `edgebll export`")
    p.add_argument("--device", default=None, help="shipped profile name or TOML path (default: this machine, or "
                   "--budget/--cores)")
    p.add_argument("--budget", default=None, help="a custom device's training budget, e.g. 300MB or 1.5GiB")
    p.add_argument("--cores", type=int, default=None, help="a custom device's cores (default: this machine's)")
    p.add_argument("--steps", type=int, default=5, help="train steps per block (default: 5; the peak settles by 3)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: 0 = ORT decides)")
    p.add_argument("--codec", default="int8", help="message codec (default: int8)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the exported one)")
    p.add_argument("--bp-run", default=None, metavar="RUN", help="a bp export of the same model to compare with")
    p.add_argument("--enforce-budget", action="store_true",
                   help="run each block under a hard memory cap derived from the device budget (RLIMIT_AS)")
    p.add_argument("--no-plot", action="store_true", help="skip RUN/profile.png")
    p.add_argument("--json", action="store_true", help="print profile.json instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--freeze-blocks", type=block_list, default=(), metavar="K[,K...]",
                   help="forward blocks measured as `edgebll train --freeze-blocks` runs them: eval graph and weights, "
                        "no gradients or optimizer state")
    add_backend_options(p)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and carry out its command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user errors print one line and exit 2; bugs raise with a traceback."""
    try:
        return run(argv)
    except EdgeBLLError as exc:
        print(f"edgebll: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgebll: interrupted; checkpoints written so far are complete (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
