"""engine/scaling.py: how many workers a source runs (pure)."""
from __future__ import annotations

import pytest

from pyexec_connector.config import SourceConfig
from pyexec_connector.engine.scaling import ScalePolicy


def test_from_config():
    policy = ScalePolicy.from_config(SourceConfig(workers=4, minWorkers=2, workerIdleSeconds=5))
    assert policy == ScalePolicy(2, 4, 5.0)
    assert ScalePolicy.from_config(SourceConfig()).min_workers == 1


@pytest.mark.parametrize("bad", [(3, 2, 60), (-1, 2, 60), (0, 0, 60), (1, 2, 0)])
def test_refuses_what_is_not_a_range(bad):
    with pytest.raises(ValueError):
        ScalePolicy(*bad)


def test_starts_min_workers_then_one_per_query_that_finds_none_idle():
    policy = ScalePolicy(1, 4, 60)
    assert policy.to_start(live=0, busy=0) == 1                 # minWorkers, at once
    assert policy.to_start(live=1, busy=0, waiting=1) == 0      # an idle worker takes it
    assert policy.to_start(live=1, busy=1, waiting=1) == 1      # every worker busy: a fork for it
    assert policy.to_start(live=2, busy=1, waiting=1) == 0      # ... which is starting (idle): no second
    assert policy.to_start(live=2, busy=2, waiting=5) == 2      # never beyond workers
    assert policy.to_start(live=4, busy=4, waiting=9) == 0
    assert policy.to_start(live=3, busy=3) == 0                 # no query waits: nothing ahead of need
    assert ScalePolicy(0, 2, 60).to_start(live=0, busy=0) == 0  # minWorkers 0: nothing until a query
    assert ScalePolicy(0, 2, 60).to_start(live=0, busy=0, waiting=1) == 1
    assert ScalePolicy(3, 3, 60).to_start(live=1, busy=0) == 2  # a died worker below minWorkers


def test_retires_longest_idle_beyond_min_workers():
    policy = ScalePolicy(1, 4, 60)
    now = 1000.0
    idle = {"a": now - 100, "b": None, "c": now - 61, "d": now - 10}
    assert policy.to_retire(idle, now) == ["a", "c"]
    assert policy.next_check(idle, now) == now - 100 + 60
    assert ScalePolicy(3, 4, 60).to_retire(idle, now) == ["a"]          # keeps three
    assert ScalePolicy(1, 4, 60).to_retire({"a": now - 100}, now) == []   # the last warm one stays
    assert ScalePolicy(1, 4, 60).next_check({"a": now - 100}, now) is None
    assert policy.to_retire({"a": None, "b": None}, now) == []
    assert policy.next_check({"a": None, "b": None}, now) is None
    assert ScalePolicy(0, 4, 60).to_retire({"a": now - 60}, now) == ["a"]   # minWorkers 0: down to none
