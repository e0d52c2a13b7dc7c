"""engine/liveness.py: when a silent worker is pinged, routed around, or killed (pure)."""
from __future__ import annotations

import pytest

from pyexec_connector.engine.liveness import LivenessPolicy, Verdict

POLICY = LivenessPolicy(interval=5, timeout=2)


def test_a_worker_heard_from_recently_is_left_alone():
    assert POLICY.verdict(now=104, last_heard=100, pinged_at=None, running=0) is Verdict.FINE
    assert POLICY.next_check(now=104, last_heard=100, pinged_at=None) == 105


def test_a_silent_worker_is_pinged_and_an_answer_clears_it():
    assert POLICY.verdict(now=105, last_heard=100, pinged_at=None, running=3) is Verdict.PING
    assert POLICY.verdict(now=106, last_heard=100, pinged_at=105, running=3) is Verdict.FINE    # on its way
    assert POLICY.next_check(now=106, last_heard=100, pinged_at=105) == 107
    assert POLICY.verdict(now=108, last_heard=105.5, pinged_at=105, running=0) is Verdict.FINE  # answered


def test_an_unanswered_ping_wedges_an_idle_worker_and_only_routes_around_a_busy_one():
    assert POLICY.verdict(now=107, last_heard=100, pinged_at=105, running=0) is Verdict.WEDGED
    # a busy worker may be in honest synchronous code: its queries' timeouts judge it, not the ping
    assert POLICY.verdict(now=107, last_heard=100, pinged_at=105, running=1) is Verdict.SILENT
    assert POLICY.verdict(now=190, last_heard=100, pinged_at=105, running=0) is Verdict.WEDGED


@pytest.mark.parametrize("bad", [(0, 1), (1, 0), (-1, 5)])
def test_refuses_non_positive_times(bad):
    with pytest.raises(ValueError):
        LivenessPolicy(*bad)
