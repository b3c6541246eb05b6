"""The per-block stage both transports run: its links, its totals and the train.json figures made from them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from edgebll.errors import TrainingError
from edgebll.run_folder import RunConfig
from edgebll.stage import EpochSums, LocalLink, StageState, epoch_records, train_summary
from edgebll.train_config import TrainConfig


def test_a_local_link_hands_frames_over_in_order_and_refuses_another_step() -> None:
    link = LocalLink(0, "activation")

    def writer(text: bytes) -> Callable[[np.ndarray, int], bytes]:
        def write(buffer: np.ndarray, offset: int) -> bytes:
            buffer[offset:offset + len(text)] = np.frombuffer(text, np.uint8)
            return text
        return write

    assert link.send_written(8, writer(b"one"), 3) == 3  # only what was written travels
    assert link.send_written(8, writer(b"two!"), 4) == 4
    assert link.take(3, bytes) == b"one"
    with pytest.raises(TrainingError, match=r"the activation link holds step 4, step 5 was asked for"):
        link.take(5, bytes)


def test_stage_totals_survive_a_checkpoint_round_trip() -> None:
    state = StageState(step=12, up_bytes=5000, down_bytes=70, validation={0: [3.0, 4, 1.5, 4]})
    state.epoch(0).loss, state.epoch(1).correct, state.epoch(1).seconds = 2.5, 7, 0.25
    assert StageState.from_json(state.to_json()) == state


def _state(loss: float, samples: int, feedback_loss: float = 0.0, feedback_samples: int = 0) -> StageState:
    sums = EpochSums(loss=loss, correct=samples // 2, metric=loss / 2, feedback_loss=feedback_loss,
                     samples=samples, feedback_samples=feedback_samples, labelled=samples, seconds=samples / 100)
    return StageState(step=1, sums={0: sums}, up_bytes=1000, down_bytes=40)


def test_the_figures_are_per_sample_and_bll_feedback_loss_per_feedback_sample() -> None:
    """One formula for both transports: loss and KL per forward sample, the feedback loss per feedback sample
    (a count of their own: over MPI a rank's feedback pass runs ahead of its forward pass)."""
    states = [_state(8.0, 16, feedback_loss=6.0, feedback_samples=24), _state(4.0, 16, 2.0, 16), _state(2.0, 16)]
    [record] = epoch_records(states, 1, "bll")
    assert record["loss"] == [0.5, 0.25, 0.125] and record["accuracy"] == [0.5, 0.5, 0.5]
    assert record["kl"] == [0.25, 0.125] and record["feedback_loss"] == [0.25, 0.125]
    assert record["samples"] == 16 and record["samples_per_block"] == [16, 16, 16] and record["seconds"] == 0.16
    assert "validation_accuracy" not in record
    assert epoch_records(states, 2, "bll") == [record]  # an epoch no stage has totals for is left out


def test_the_summary_counts_bytes_over_the_whole_run_and_samples_of_this_invocation() -> None:
    states = [_state(1.0, 16), _state(1.0, 16), _state(1.0, 16)]
    run = RunConfig(model="m", method="bll", blocks=3, batch_size=16, lr=0.1)
    summary = train_summary(states, run_config=run, train=TrainConfig(epochs=1),
                            base_lr=0.1, batch=16, total=10, start=4, seconds=2.0, transport="inprocess", ranks=1)
    assert summary["samples"] == 6 * 16 and summary["samples_per_s"] == 48.0 and summary["resumed_from_step"] == 4
    assert summary["message_bytes_per_step"] == [100.0, 100.0] and summary["feedback_bytes_per_step"] == [4.0]
    assert summary["message_bytes_per_sample"] == round(2040 / 160, 1)
    assert summary["config"]["lr"] == 0.1 and summary["epochs"][0]["loss"] == [0.0625] * 3
