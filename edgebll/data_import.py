"""``edgebll data import``: dataset folders from .npz files, IDX files and folders of images.

Every source ends in :func:`edgebll.dataset_folder.write_dataset_folder`, which checks the arrays
and writes them atomically. Folders of images are read with Pillow (host side; a board receives
the dataset folder, not the images).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgebll.dataset_folder import import_npz, write_dataset_folder
from edgebll.errors import DataError
from edgebll.idx import FILE_PREFIXES, find_idx_file, read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def import_any(source: str | os.PathLike, out: str | os.PathLike, *, test: str | os.PathLike | None = None,
               name: str | None = None, classes: list[str] | None = None, size: tuple[int, int] | None = None,
               channels: int | None = None, overwrite: bool = False) -> Path:
    """A dataset folder from ``source``: an .npz (with ``test`` another), a folder of IDX files (both splits), or a
    folder with one sub-folder of images per class (with ``test`` another such folder)."""
    src = Path(source)
    if src.is_file() and src.suffix == ".npz":
        if test is None:
            raise DataError(f"{src}: an .npz holds one split; give the test split with --test TEST.npz")
        return import_npz(src, test, out, name=name, classes=classes, overwrite=overwrite)
    if not src.is_dir():
        raise DataError(f"{src}: not an .npz file nor a folder; give an .npz (x, y), a folder of IDX files, or a folder "
                        "with one sub-folder of images per class")
    if any(p.name.startswith(f"{FILE_PREFIXES['train']}-images-idx") for p in src.iterdir()):
        if test is not None:
            raise DataError(f"{src}: a folder of IDX files holds both splits; drop --test")
        return import_idx(src, out, name=name, classes=classes, overwrite=overwrite)
    if test is None:
        raise DataError(f"{src}: a folder of images holds one split; give the test images with --test DIR (the same "
                        "class sub-folders)")
    return import_image_folders(src, Path(test), out, name=name, size=size, channels=channels, overwrite=overwrite)


def import_idx(folder: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
               classes: list[str] | None = None, overwrite: bool = False) -> Path:
    """A dataset folder from the four IDX files of MNIST-style data (``train-…`` and ``t10k-…``, gzipped or not)."""
    folder = Path(folder)
    splits = {}
    for split in ("train", "test"):
        prefix = FILE_PREFIXES[split]
        images = read_idx(find_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        splits[split] = (images[:, None] if images.ndim == 3 else images, labels.astype(np.int64))
    return write_dataset_folder(out, splits, name=name, classes=classes, overwrite=overwrite)


def import_image_folders(train: Path, test: Path, out: str | os.PathLike, *, name: str | None = None,
                         size: tuple[int, int] | None = None, channels: int | None = None,
                         overwrite: bool = False) -> Path:
    """A dataset folder from ``train/CLASS/*.png`` and ``test/CLASS/*.png`` (any Pillow format).

    Classes are the sub-folder names, sorted; the test folder must have the same ones. Every image
    is converted to ``channels`` (1: grayscale, 3: RGB; default 1 if every training image is
    grayscale, else 3) and resized (bilinear) to ``size`` (height, width; default: the first
    training image's size).
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(f"importing image files needs Pillow ({exc}); hint: pip install pillow (on the host)") from exc
    names = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(names) < 2:
        raise DataError(f"{train}: found {len(names)} class sub-folder(s); a folder of images needs one sub-folder per "
                        "class (at least 2), each holding that class's images")
    test_names = sorted(p.name for p in test.iterdir() if p.is_dir())
    if test_names != names:
        raise DataError(f"{test}: class sub-folders {test_names} differ from {train}'s {names}")
    files = {split: [(path, label) for label, cls in enumerate(names) for path in sorted((root / cls).iterdir())
                     if path.suffix.lower() in IMAGE_SUFFIXES] for split, root in (("train", train), ("test", test))}
    for split, listed in files.items():
        if not listed:
            raise DataError(f"{train if split == 'train' else test}: no image files ({sorted(IMAGE_SUFFIXES)})")
    if channels is None:
        with Image.open(files["train"][0][0]) as first:
            gray = first.mode in ("1", "L", "I;16", "I")
        channels = 1 if gray else 3
    if channels not in (1, 3):
        raise DataError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    splits = {}
    for split, listed in files.items():
        pixels = []
        for path, _ in listed:
            try:
                with Image.open(path) as image:
                    image = image.convert(mode)
                    if size is None:
                        size = (image.height, image.width)
                    if (image.height, image.width) != size:
                        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    array = np.asarray(image, dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"{path}: not an image Pillow can read ({exc})") from exc
            pixels.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        splits[split] = (np.stack(pixels), np.array([label for _, label in listed], np.int64))
    return write_dataset_folder(out, splits, name=name, classes=names, overwrite=overwrite)
