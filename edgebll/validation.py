"""A validation split held out of the training set, and the forward-chain accuracy used by eval.

Model choices (epochs, learning rate, K, heads) are made on the validation split; the test set
is evaluated once, on the final epoch's weights (``edgebll eval``), never to pick the best epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from edgebll.data import Dataset, load_fashion_mnist
from edgebll.errors import EdgeBLLError
from edgebll.runner import BlockRunner

Send = Callable[[np.ndarray, int], np.ndarray]
"""(message, sending block) -> the message as the next block decodes it."""


def split_validation(data: Dataset, size: int) -> tuple[Dataset, Dataset]:
    """(training part, validation part): the last ``size`` samples are held out for validation."""
    if not 0 < size < len(data):
        raise EdgeBLLError(f"--val-split {size}: expected between 1 and {len(data) - 1} of the {len(data)} training "
                           "images; hint: --val-split 5000 holds out the last 5,000")
    cut = len(data) - size
    return Dataset(data.images[:cut], data.labels[:cut]), Dataset(data.images[cut:], data.labels[cut:])


def training_data(data: Dataset | None, data_dir: str | None, limit: int | None,
                  val_split: int) -> tuple[Dataset, Dataset | None]:
    """The images to train on and the validation split (None without ``val_split``).

    The validation images are the last ``val_split`` of the whole training set; ``limit`` then
    takes the first images of what remains, so a short run never trains on its validation images.
    """
    if data is None:
        data = load_fashion_mnist("train", data_dir, limit=None if val_split else limit)
    validation = None
    if val_split:
        data, validation = split_validation(data, val_split)
    return (data.subset(limit) if limit is not None else data), validation


def chain_accuracy(runners: Sequence[BlockRunner], data: Dataset, send: Send, num_classes: int, *,
                   batch_size: int = 500, progress: bool = False, desc: str = "eval") -> tuple[list[float], float]:
    """Per-block accuracy of the forward chain's eval graphs on ``data``, and the last block's mean loss.

    Every message goes through ``send`` (the codec). A BLL forward block's prior input only feeds
    its loss, so it is zero here: the feedback blocks are not needed at test time.
    """
    correct = np.zeros(len(runners))
    loss = 0.0
    for x, labels in tqdm(data.batches(batch_size), total=data.num_batches(batch_size), desc=desc, unit="batch",
                          disable=not progress):
        h = x
        no_prior = np.zeros((len(labels), num_classes), np.float32)
        for k, runner in enumerate(runners):
            side = no_prior if runner.manifest.input("prior") is not None else labels
            result = runner.eval_step(h, side)
            correct[k] += int((result.logits.argmax(1) == labels).sum())
            if result.message is not None:
                h = send(result.message, k)
        loss += result.loss * len(labels)
    return (correct / len(data)).round(5).tolist(), round(loss / len(data), 5)
