"""A validation split held out of the training set, and the forward-chain accuracy used by eval.

Model choices (epochs, learning rate, K, heads) are made on the validation split; the test set
is evaluated once, on the final epoch's weights (``edgebll eval``), never to pick the best epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from edgebll.batching import InMemoryDataset, first_sample
from edgebll.errors import DataError, EdgeBLLError
from edgebll.manifest import BlockManifest
from edgebll.metrics import count_correct
from edgebll.run_data import load_run_dataset
from edgebll.backends import Runner

_Samples = TypeVar("_Samples", bound=InMemoryDataset)

Send = Callable[[np.ndarray, int], np.ndarray]
"""(message, sending block) -> the message as the next block decodes it."""


def split_validation(data: _Samples, size: int) -> tuple[_Samples, _Samples]:
    """(training part, validation part): the last ``size`` samples are held out for validation.

    Any in-memory dataset splits: Fashion-MNIST images or the sequence task's token sequences.
    """
    if not 0 < size < len(data):
        raise EdgeBLLError(f"--val-split {size}: expected between 1 and {len(data) - 1} of the {len(data)} training "
                           "samples; hint: --val-split 5000 holds out the last 5,000")
    cut = len(data) - size
    return data.slice(0, cut), data.slice(cut, len(data))


def training_data(data: InMemoryDataset | None, data_dir: str | None, limit: int | None, val_split: int,
                  dataset: dict[str, Any] | None = None) -> tuple[InMemoryDataset, InMemoryDataset | None]:
    """The samples to train on and the validation split (None without ``val_split``).

    Without ``data`` it is the training split of ``dataset`` (run.json's ``data``: Fashion-MNIST or
    the sequence task, see :func:`~edgebll.run_data.load_run_dataset`). The validation samples are
    the last ``val_split`` of the whole training set; ``limit`` then takes the first samples of what
    remains, so a short run never trains on its validation samples.
    """
    if data is None:
        data = load_run_dataset(dataset, "train", data_dir, limit=None if val_split else limit)
    validation = None
    if val_split:
        data, validation = split_validation(data, val_split)
    return (data.subset(limit) if limit is not None else data), validation


def check_data_fits(data: InMemoryDataset, manifests: Sequence[BlockManifest], where: str) -> None:
    """Refuse data whose samples or labels the run's blocks (their ``manifests``, in order) cannot take, before the
    first step, naming what differs."""
    inputs, labels = data.arrays()
    first, last = manifests[0], manifests[-1]
    spec = first.inputs[0]  # block 0 takes the samples first, then its side input
    expected = list(spec.per_sample_shape())
    if list(inputs.shape[1:]) != expected or np.dtype(spec.dtype) != inputs.dtype:
        raise DataError(f"{where}: samples are {inputs.dtype} {list(inputs.shape[1:])}, but the run's first block takes "
                        f"{spec.dtype} {expected}; hint: export the run for this data (edgebll export --data DIR)")
    classes = int(last.output("logits").shape[-1])
    if len(labels) and (int(labels.max()) >= classes or int(labels.min()) < 0):
        bad = first_sample((labels >= classes) | (labels < 0))
        raise DataError(f"{where}: sample {bad} has label {int(labels[bad].max())}, but the run has {classes} classes "
                        f"(0..{classes - 1}); hint: export the run for this data (edgebll export --data DIR)")


def eval_side(runner: Runner, labels: np.ndarray) -> np.ndarray:
    """A block's side input at evaluation: the labels, or for a BLL forward block a zero prior (in the
    manifest's per-sample shape, e.g. ``[T, C]`` for per-token heads), which feeds only its loss."""
    prior = runner.manifest.input("prior")
    return labels if prior is None else np.zeros((len(labels), *prior.per_sample_shape()), np.float32)


def chain_counts(runners: Sequence[Runner], data: InMemoryDataset, send: Send, *, batch_size: int,
                 progress: bool = False, desc: str = "eval") -> list[list[float]]:
    """Per block of the forward chain's eval graphs on ``data``: [correct labels, labels, loss sum, samples].

    Accuracy is per label: per image for a classifier, per token for a sequence model. Every
    message goes through ``send`` (the codec). A BLL forward block's prior input only feeds its
    loss, so it is zero here (in the manifest's per-sample shape, e.g. ``[T, C]`` for per-token
    heads): the feedback blocks are not needed at test time.
    """
    correct, loss = np.zeros(len(runners)), np.zeros(len(runners))
    labelled = 0
    for x, labels in tqdm(data.batches(batch_size), total=data.num_batches(batch_size), desc=desc, unit="batch",
                          disable=not progress):
        h = x
        for k, runner in enumerate(runners):
            result = runner.eval_step(h, eval_side(runner, labels))
            correct[k] += count_correct(result.logits, labels)
            loss[k] += result.loss * len(labels)
            if result.message is not None:
                h = send(result.message, k)
        labelled += labels.size
    return [[float(c), labelled, float(s), len(data)] for c, s in zip(correct, loss)]


def chain_accuracy(runners: Sequence[Runner], data: InMemoryDataset, send: Send, *, batch_size: int,
                   progress: bool = False, desc: str = "eval") -> tuple[list[float], float]:
    """Per-block accuracy of the forward chain's eval graphs on ``data`` (:func:`chain_counts`), and the last
    block's mean loss.

    Callers pass the run's training batch size: an eval batch never needs more memory than a
    training step of that size, so a block the memory profile says fits also fits at test time
    (resnet18's block 0, K=4: 346 MiB to evaluate 500 images, 202 MiB to train at 64, 59 MiB to
    evaluate 64; benchmarks/eval_memory.py).
    """
    counts = chain_counts(runners, data, send, batch_size=batch_size, progress=progress, desc=desc)
    accuracy = [round(correct / max(labelled, 1), 5) for correct, labelled, _, _ in counts]
    return accuracy, round(counts[-1][2] / max(counts[-1][3], 1), 5)
