"""Stream slots: how many streams and long-polls a web process admits."""
from __future__ import annotations

import pytest

from ffworker.config import Settings
from ffworker.stream_slots import Slots, StreamLimits


@pytest.mark.parametrize("threads, expected", [(32, 24), (16, 12), (8, 4), (5, 1), (4, 0), (1, 0), (64, 48)])
def test_stream_slots_leave_threads_for_ordinary_requests(threads, expected):
    assert StreamLimits.from_settings(Settings(), threads=threads).max_streams == expected


def test_an_explicit_stream_limit_is_kept_below_the_thread_count():
    assert StreamLimits.from_settings(Settings(sse_max_streams=10), threads=32).max_streams == 10
    assert StreamLimits.from_settings(Settings(sse_max_streams=40), threads=32).max_streams == 31
    settings = Settings.from_env({"FFWORKER_SSE_KEEPALIVE_S": "5", "FFWORKER_SSE_MAX_DURATION_S": "60"})
    limits = StreamLimits.from_settings(settings)
    assert (limits.max_streams, limits.keepalive_s, limits.max_duration_s) == (24, 5.0, 60.0)


def test_slots_are_capped_and_released():
    slots = Slots(2)
    assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()
    slots.release()
    assert slots.open == 1 and slots.try_acquire()
