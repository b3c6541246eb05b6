"""A small shifted dataset to fine-tune on: Fashion-MNIST photographed "in low light", five classes only.

What a board meets after deployment rarely looks like the training set. This script makes such
data from Fashion-MNIST: only the classes ``--classes`` (default: T-shirt/top, Trouser, Pullover,
Dress, Coat), shadows lifted by a camera's gamma (``255 (x / 255) ** 0.5``: not undone by the
dataset's own normalisation, as a change of contrast or brightness would be), lower contrast
(``0.6 x + 40``) and sensor noise (Gaussian, sigma ``--noise`` grey levels, seeded). The labels keep Fashion-MNIST's ten classes, so a
run trained on Fashion-MNIST fine-tunes on it as it is (``edgebll export --init-from``).

    python tools/shifted_fashion.py --out data/low-light [--train 3000] [--test 1000]

Writes an edgebll dataset folder (``edgebll export --data``, ``edgebll train --data``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgebll.idx import read_idx, resolve_data_dir
from edgebll.dataset_folder import write_dataset_folder

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PREFIX = {"train": "train", "test": "t10k"}


def _idx(data_dir: Path, stem: str) -> np.ndarray:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return read_idx(data_dir / name)
    raise SystemExit(f"{data_dir}: no {stem}(.gz); install Fashion-MNIST (make data) or pass --data-dir")


def low_light(images: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma 0.5, lower contrast, sensor noise: uint8 in, uint8 out."""
    lifted = 255 * (images.astype(np.float32) / 255) ** 0.5
    shifted = 0.6 * lifted + 40 + rng.normal(0, noise, images.shape)
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


def shifted_split(data_dir: Path, split: str, classes: list[int], count: int, noise: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of ``classes`` in Fashion-MNIST's ``split``, shifted; [N, 1, 28, 28] uint8, labels."""
    images = _idx(data_dir, f"{PREFIX[split]}-images-idx3-ubyte")
    labels = _idx(data_dir, f"{PREFIX[split]}-labels-idx1-ubyte").astype(np.int64)
    keep = np.flatnonzero(np.isin(labels, classes))[:count]
    if len(keep) < count:
        raise SystemExit(f"{split}: only {len(keep)} images of classes {classes}, asked for {count}")
    rng = np.random.default_rng(seed + (split == "test"))
    return low_light(images[keep][:, None], noise, rng), labels[keep]


def make(out: str | Path, *, train: int = 3000, test: int = 1000, classes: tuple[int, ...] = (0, 1, 2, 3, 4),
         noise: float = 25.0, seed: int = 0, data_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the shifted dataset folder ``out``; returns it."""
    source = resolve_data_dir(data_dir)
    splits = {split: shifted_split(source, split, list(classes), n, noise, seed)
              for split, n in (("train", train), ("test", test))}
    return write_dataset_folder(out, splits, name=Path(out).name, classes=CLASSES, overwrite=overwrite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the dataset folder to write")
    parser.add_argument("--train", type=int, default=3000, help="training images (default: 3000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default: 1000)")
    parser.add_argument("--classes", default="0,1,2,3,4", help="Fashion-MNIST classes kept (default: 0,1,2,3,4)")
    parser.add_argument("--noise", type=float, default=25.0, help="sensor noise sigma in grey levels (default: 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder (default: as edgebll finds it)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    out = make(args.out, train=args.train, test=args.test, classes=tuple(int(c) for c in args.classes.split(",")),
               noise=args.noise, seed=args.seed, data_dir=args.data_dir, overwrite=args.overwrite)
    print(f"wrote {out}: {args.train} training and {args.test} test images of classes {args.classes}, in low light")


if __name__ == "__main__":
    main()
