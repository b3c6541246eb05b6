"""What an MPI rank sets up before its first step: the labels every rank needs, and its links to its neighbours.

Rank 0 reads the data and broadcasts the labels once (every rank computes each epoch's sample
order from (seed, epoch), so no index ever travels); only rank 0 keeps the samples. Rank k's
links carry activations up to k+1, BLL's beta messages down to k-1 and, with ``--val-split``,
the held-out batches up on links of their own (never counted as training traffic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgebll import codec as message_codec
from edgebll.backends import Runner
from edgebll.errors import EdgeBLLError
from edgebll.links import ENVELOPE, FrameReceiver, FrameSender
from edgebll.manifest import BlockManifest, TensorSpec
from edgebll.train_config import TrainConfig
from edgebll.validation import check_data_fits, training_data

ACTIVATION_TAG, FEEDBACK_TAG, VALIDATION_TAG = 11, 12, 15  # 13, 14: edgebll.rank_control's


@dataclass(slots=True)
class RankData:
    """The training (and validation) labels on every rank; the samples on rank 0 only (None elsewhere)."""

    labels: np.ndarray
    inputs: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_inputs: np.ndarray | None = None


def broadcast_labels(comm: Any, *, train: TrainConfig, data_dir: str | None, dataset: dict[str, Any] | None,
                     manifests: list[BlockManifest]) -> RankData:
    """Rank 0 loads run.json's ``dataset`` (checked against the first and last blocks' ``manifests``, which only
    rank 0 passes) and sends every rank the labels; with ``--val-split`` it splits as the in-process runtime does."""
    loaded = RankData(np.empty(0, np.int64))
    counts, label_shape, error = (0, 0), (), None
    if comm.Get_rank() == 0:
        try:
            data, validation = training_data(None, data_dir, train.limit, train.val_split, dataset)
            check_data_fits(data, manifests, "training data")
            loaded.inputs, loaded.labels = data.arrays()
            if validation is not None:
                loaded.val_inputs, loaded.val_labels = validation.arrays()
            counts = (len(data), len(validation) if validation is not None else 0)
            label_shape = loaded.labels.shape[1:]  # [N] per image, [N, T] per token
        except EdgeBLLError as exc:
            error = str(exc)
    counts, label_shape, error = comm.bcast((counts, label_shape, error), root=0)
    if error is not None:
        raise EdgeBLLError(f"rank 0 cannot load the training data: {error}")
    if loaded.inputs is None:
        loaded.labels = np.empty((counts[0], *label_shape), np.int64)
    comm.Bcast(loaded.labels, root=0)
    if counts[1]:
        if loaded.val_labels is None:
            loaded.val_labels = np.empty((counts[1], *label_shape), np.int64)
        comm.Bcast(loaded.val_labels, root=0)
    return loaded


@dataclass(slots=True)
class RankLinks:
    """One rank's links (None where it has no such neighbour) and the most bytes their buffers hold."""

    up_recv: FrameReceiver | None = None
    up_send: FrameSender | None = None
    down_recv: FrameReceiver | None = None
    down_send: FrameSender | None = None
    val_recv: FrameReceiver | None = None
    val_send: FrameSender | None = None
    buffer_bytes: int = 0

    def flush(self) -> None:
        """Wait until every frame sent has been taken."""
        for link in (self.up_send, self.down_send, self.val_send):
            if link is not None:
                link.flush()

    def cancel(self) -> None:
        """Withdraw the receive buffers still posted (the run is over)."""
        for link in (self.up_recv, self.down_recv, self.val_recv):
            if link is not None:
                link.cancel()


def open_links(comm: Any, *, blocks: int, batch: int, train: TrainConfig, depth: int, timeout: float,
               runner: Runner, feedback: Runner | None, validation: bool) -> RankLinks:
    """The links of rank ``comm.Get_rank()``, which trains forward block ``runner`` (and BLL's ``feedback``)."""
    rank = comm.Get_rank()
    options = dict(granularity=train.granularity, group_size=train.group_size)
    common = dict(rank=rank, depth=depth, timeout=timeout)

    def capacity(spec: TensorSpec) -> int:
        return message_codec.frame_nbytes([batch, *spec.per_sample_shape()], train.codec, **options)

    def receiver(peer: int, tag: int, describe: str, spec: TensorSpec) -> FrameReceiver:
        return FrameReceiver(comm, peer=peer, tag=tag, describe=describe, capacity=capacity(spec), **common)

    def sender(peer: int, tag: int, describe: str) -> FrameSender:
        return FrameSender(comm, peer=peer, tag=tag, describe=describe, **common)

    links = RankLinks()
    x = runner.manifest.inputs[0]
    if rank > 0:
        links.up_recv = receiver(rank - 1, ACTIVATION_TAG, "activation", x)
    if rank < blocks - 1:
        links.up_send = sender(rank + 1, ACTIVATION_TAG, "activation")
    if feedback is not None and rank < blocks - 2:
        links.down_recv = receiver(rank + 1, FEEDBACK_TAG, "beta message", feedback.manifest.inputs[0])
    if feedback is not None and rank > 0:
        links.down_send = sender(rank - 1, FEEDBACK_TAG, "beta message")
    if validation and rank > 0:
        links.val_recv = receiver(rank - 1, VALIDATION_TAG, "validation activation", x)
    if validation and rank < blocks - 1:
        links.val_send = sender(rank + 1, VALIDATION_TAG, "validation activation")
    # what the links hold at most: depth frames on each side of each link, the validation rings
    # included (counted in train.json; memory.estimate_peak_bytes(in_flight=depth, validation=...))
    receivers = (links.up_recv, links.down_recv, links.val_recv)
    links.buffer_bytes = sum(depth * r.capacity for r in receivers if r is not None)
    up = runner.manifest.output("message")
    senders = ((links.up_send, up), (links.val_send, up),
               (links.down_send, feedback.manifest.output("message") if feedback else None))
    links.buffer_bytes += sum(depth * (ENVELOPE.size + capacity(spec)) for link, spec in senders
                              if link is not None and spec is not None)
    return links

