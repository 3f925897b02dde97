"""StepRecord against a plain reference: the counters add up, and the probability history stays bounded while
spanning the whole run (every other record dropped, interval doubled, when full)."""

from __future__ import annotations

import pytest
import torch

from lightning_slsam.lightning_adapter.step_record import StepRecord


def reference_history(steps: int, every: int, size: int) -> tuple[list[int], int]:
    """The steps whose probabilities are kept, simulated the slow way: record, and thin when over ``size``."""
    kept: list[int] = []
    interval = every
    for step in range(1, steps + 1):
        if (step - 1) % interval == 0:
            kept.append(step)
            if len(kept) > size:
                kept = kept[::2]
                interval *= 2
    return kept, interval


@pytest.mark.parametrize(("steps", "every", "size"), [(10, 1, 512), (100, 1, 8), (333, 3, 5), (64, 2, 1)])
def test_history_is_bounded_like_the_reference(steps: int, every: int, size: int) -> None:
    record = StepRecord(every, size)
    record.start(2)
    for step in range(1, steps + 1):
        record.add(0.5, 0.25, 2, torch.tensor([True, False]), torch.tensor([float(step), 0.0], dtype=torch.float64))
    kept, interval = reference_history(steps, every, size)
    history = record.probability_history()
    assert history is not None and history.dtype == torch.float32
    assert history[:, 0].tolist() == [float(s) for s in kept]
    assert record.interval == interval and len(kept) <= size


def test_counters_and_state_round_trip() -> None:
    record = StepRecord(1, 4)
    record.start(3)
    record.add(0.2, 0.0, 1, torch.tensor([True, False, True]), None)
    record.add(0.6, 0.6, 2, torch.tensor([False, False, True]), None)
    assert record.steps == 2 and record.passes_sum == 3
    assert record.mean(record.active_ratio_sum) == pytest.approx(0.4)
    assert record.selection_counts.tolist() == [1, 0, 2]
    assert record.probability_history() is None  # a method that does not sample records nothing
    again = StepRecord(1, 4)
    again.load_state_dict(record.state_dict())
    assert again.state_dict().keys() == record.state_dict().keys()
    assert torch.equal(again.selection_counts, record.selection_counts) and again.steps == 2
    record.start(3)  # a new fit: counts and history begin again, the counters go on
    assert record.selection_counts.tolist() == [0, 0, 0] and record.steps == 2
