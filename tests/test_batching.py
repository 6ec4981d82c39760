"""The stepper's batching decision alone: how long a round waits for more cameras (no clock, no Redis).

`hold_seconds` is pure: the time is passed in, so every case is exact.
"""

from __future__ import annotations

import pytest

from worker.cli import build_parser
from worker.config import Settings, settings_from_args
from worker.model.batching import COST_MARGIN, RoundCost, hold_seconds


def fitted(*rounds: tuple[int, float]) -> RoundCost:
    cost = RoundCost()
    for frames, seconds in rounds:
        cost.observe(frames, seconds)
    return cost


def test_round_cost_fits_fixed_and_per_camera_frame_time() -> None:
    # 20 ms fixed + 5 ms per camera-frame, seen at three batch sizes.
    cost = fitted(*[(n, 0.020 + 0.005 * n) for n in (1, 8, 32)] * 5)
    fixed, per = cost.line()
    assert fixed == pytest.approx(0.020) and per == pytest.approx(0.005)
    assert cost.seconds(64) == pytest.approx(0.340)


def test_round_cost_of_one_batch_size_splits_it_half_fixed() -> None:
    cost = fitted((4, 0.080), (4, 0.080))
    assert cost.line() == pytest.approx((0.040, 0.010))
    assert cost.seconds(16) == pytest.approx(0.200)  # bigger batches dearer, but not 4x
    assert RoundCost().seconds(100) == 0.0  # nothing seen yet: a round looks free


def test_round_cost_never_goes_negative_on_noisy_rounds() -> None:
    # Bigger rounds that happened to be faster: no negative time per camera-frame.
    cost = fitted((1, 0.050), (16, 0.040), (1, 0.050), (16, 0.040))
    fixed, per = cost.line()
    assert per == 0.0 and fixed == pytest.approx(0.045, abs=2e-4)  # recent rounds weigh a little more
    # Time falling steeply with size would give a negative fixed part: capped at zero fixed.
    fixed, per = fitted((1, 0.001), (2, 0.100), (1, 0.001), (2, 0.100)).line()
    assert fixed == 0.0 and per > 0


def test_old_rounds_fade() -> None:
    cost = fitted(*[(n, 0.010 * n) for n in (2, 4)] * 20)
    assert cost.seconds(4) == pytest.approx(0.040)
    for _ in range(300):  # the model got 3x slower: the estimate follows
        cost.observe(2, 0.060)
        cost.observe(4, 0.120)
    assert cost.seconds(4) == pytest.approx(0.120, rel=0.01)


def test_a_round_waits_for_expected_cameras_until_the_earliest_slot_must_start() -> None:
    cost = fitted(*[(n, 0.010 + 0.002 * n) for n in (2, 10)] * 3)  # 10 ms + 2 ms per camera-frame
    # Two cameras ready, due at t=1.0 and 1.1; eight more expected: a batch of 10 takes 30 ms.
    wait = hold_seconds(0.5, [1.1, 1.0], 8, cost)
    assert wait == pytest.approx(1.0 - COST_MARGIN * 0.030 - 0.5)
    # Later, the same decision waits less, and past the start-by time not at all.
    assert hold_seconds(0.9, [1.1, 1.0], 8, cost) == pytest.approx(0.1 - COST_MARGIN * 0.030)
    assert hold_seconds(1.0 - COST_MARGIN * 0.030, [1.1, 1.0], 8, cost) == 0.0
    assert hold_seconds(0.99, [1.1, 1.0], 8, cost) == 0.0


def test_the_wait_counts_the_batch_it_waits_for() -> None:
    cost = fitted(*[(n, 0.010 + 0.002 * n) for n in (2, 10)] * 3)
    few = hold_seconds(0.0, [1.0], 1, cost)
    many = hold_seconds(0.0, [1.0], 99, cost)
    assert few - many == pytest.approx(COST_MARGIN * 0.002 * 98)  # 98 more camera-frames to step


def test_a_slot_that_would_miss_its_deadline_is_never_held() -> None:
    cost = fitted((10, 0.300), (10, 0.300))
    # Due in 100 ms, but a round of 12 takes longer than that: step now, whatever else is coming.
    assert hold_seconds(0.0, [0.1, 5.0], 10, cost) == 0.0
    # Already late (a backlog, a replay): never held.
    assert hold_seconds(10.0, [3.0, 4.0], 50, cost) == 0.0


def test_nothing_to_wait_for_steps_now() -> None:
    cost = fitted((4, 0.010), (4, 0.010))
    assert hold_seconds(0.0, [1.0, 1.0], 0, cost) == 0.0  # every camera's slot is here
    assert hold_seconds(0.0, [], 5, cost) == 0.0  # nothing ready: the stepper waits for work anyway


def test_latency_budget_flag_and_setting() -> None:
    def settings(*argv: str) -> Settings:
        return settings_from_args(build_parser(["run", *argv]).parse_args(["run", *argv]))

    assert settings().latency_budget_ms is None  # one slot, from the model's fps
    assert settings("--latency-budget", "1000").latency_budget_ms == 1000.0
    assert settings("--latency-budget-ms", "0").latency_budget_ms == 0.0  # no waiting
    with pytest.raises(SystemExit) as exc:
        settings("--latency-budget", "-5")
    assert exc.value.code == 2
    with pytest.raises(SystemExit, match="latency_budget_ms"):
        settings("--latency-budget-ms", "90000")  # over a minute: a mistake
