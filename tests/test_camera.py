"""The slot clock and the two windows, with a backend that records frames instead of computing.

The model is beside the point here: each state is the tuple of frame values it has seen, so a test
can see exactly which frames every prediction's state holds.
"""

from __future__ import annotations

import numpy as np

from worker.pipeline.timeline import CameraTimeline, Clock

W, GAP = 6, 2


def img(value: int) -> np.ndarray:
    return np.full((1, 1, 3), value % 256, np.uint8)


def run(frames: list[tuple[int, int]], start_timeline: CameraTimeline | None = None):  # type: ignore[no-untyped-def]
    """Feed (ms, value) frames; returns {slot: (window start slot, frames, state)} and the timeline."""
    tl = start_timeline or CameraTimeline("cam", Clock.of(5), W, GAP, ())
    out = {}
    queued = []
    for ms, value in frames:  # accept everything first, as the worker may, then step
        queued.extend(tl.accept(ms, f"{ms}-0", img(value), ms) or [])
    for w in queued:
        new = [(*s, int(w.image[0, 0, 0])) for s in tl.states_for(w)]
        chosen = tl.advance(w.slot, new)
        out[w.slot] = (chosen.start_slot, chosen.frames, chosen.state, w.repeated)
    return out, tl


def test_clock_is_exact_at_boundaries() -> None:
    clock = Clock.of(5)
    assert [clock.slot(ms) for ms in (0, 199, 200, 201, 1_000_000_000_000)] == [0, 0, 1, 1, 5_000_000_000]
    assert (clock.start_ms(7), clock.end_ms(7)) == (1400, 1600)
    twelve = Clock.of(12)
    assert [twelve.slot(twelve.start_ms(k)) for k in range(100)] == list(range(100))
    assert all(twelve.slot(twelve.start_ms(k) - 1) == k - 1 for k in range(1, 100))


def test_one_frame_per_slot_extra_frames_dropped() -> None:
    tl = CameraTimeline("cam", Clock.of(5), W, GAP, ())
    assert tl.accept(1000, "1000-0", img(1), 1000) is not None
    assert tl.accept(1100, "1100-0", img(2), 1100) is None  # same slot
    assert tl.accept(900, "900-0", img(3), 900) is None  # older slot


def test_windows_reset_on_phase_and_context_stays_between_half_and_full() -> None:
    out, _ = run([(k * 200, k) for k in range(0, 30)])
    for slot, (start, frames, state, _) in out.items():
        assert state == tuple(range(start, slot + 1))  # exactly the window's frames, in order
        assert start % (W // 2) == 0
        if slot >= W // 2:
            assert W // 2 < frames <= W
    assert out[5][0] == 0 and out[6][0] == 3 and out[9][0] == 6  # handed over at each reset


def test_short_gaps_repeat_the_last_frame_long_gaps_restart() -> None:
    out, _ = run([(0, 10), (200, 11), (800, 12), (3000, 13)])  # slots 0,1,4 then 15
    assert [out[s][3] for s in (2, 3)] == [True, True]
    assert out[4][2] == (10, 11, 11, 11, 12)
    assert 14 not in out and out[15][2] == (13,) and out[15][1] == 1  # fresh after a long gap


def test_replay_from_the_window_start_rebuilds_the_same_states() -> None:
    rng = np.random.default_rng(0)
    slots = sorted(set(rng.choice(120, 80, replace=False).tolist()))
    frames = [(s * 200 + int(rng.integers(0, 199)), s) for s in slots]
    full, _ = run(frames)
    for cut in range(10, 110, 7):  # pretend slot `cut` was the last published, then resume
        fresh = CameraTimeline("cam", Clock.of(5), W, GAP, ())
        first = fresh.replay_start_slot(cut + 1)
        replayed, _ = run([f for f in frames if f[0] // 200 >= first], fresh)
        for slot in full:
            if slot > cut:
                assert replayed[slot] == full[slot], (cut, slot)
