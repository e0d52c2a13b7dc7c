"""The pool's new per-source keys (preload, minWorkers, workerIdleSeconds, maxQueriesPerWorker,
maxWorkerMemoryMB) and the recycle policy (engine/recycle.py), which is pure."""
from __future__ import annotations

import logging
import os
import random

import pytest

from pyexec_connector.config import SourceConfig, parse_source_config
from pyexec_connector.engine.recycle import RecyclePolicy, RecycleReason, jittered, resident_bytes


def general(**keys):
    return {"pythonExecConfig": {"general": keys}}


def test_pool_keys_defaults():
    config = SourceConfig()
    assert config.preload == ()
    assert config.minWorkers == 1 and config.min_worker_count == 1
    assert config.workerIdleSeconds == 60
    assert config.maxQueriesPerWorker == 0 and config.maxWorkerMemoryMB == 0
    assert RecyclePolicy.from_config(config) == RecyclePolicy(0, 0)


def test_pool_keys_values(caplog):
    config = parse_source_config(general(preload=["numpy", " pandas", "my_models.v2", "numpy"], workers=4,
                                         minWorkers=2, workerIdleSeconds=5.5, maxQueriesPerWorker=500,
                                         maxWorkerMemoryMB=300), "src")
    assert config.preload == ("numpy", "pandas", "my_models.v2")
    assert (config.worker_count, config.min_worker_count, config.workerIdleSeconds) == (4, 2, 5.5)
    assert RecyclePolicy.from_config(config) == RecyclePolicy(500, 300 * 1024 * 1024)
    assert not caplog.records            # all known keys: no warning
    # minWorkers beyond the machine's default worker count is kept within it
    assert SourceConfig(minWorkers=512).min_worker_count == SourceConfig().worker_count


@pytest.mark.parametrize(("keys", "named"), [
    ({"preload": "numpy"}, "preload"),
    ({"preload": ["numpy", "1bad"]}, "preload"),
    ({"preload": ["os; import x"]}, "preload"),
    ({"preload": [3]}, "preload"),
    ({"workers": 2, "minWorkers": 3}, "minWorkers"),
    ({"minWorkers": -1}, "minWorkers"),
    ({"workerIdleSeconds": 0}, "workerIdleSeconds"),
    ({"maxQueriesPerWorker": -5}, "maxQueriesPerWorker"),
    ({"maxWorkerMemoryMB": "lots"}, "maxWorkerMemoryMB"),
])
def test_bad_pool_keys_are_errors_naming_the_key(caplog, keys, named):
    config, problems = SourceConfig.parse(keys)
    assert config is None and list(problems) == [named]
    with caplog.at_level(logging.ERROR):
        assert parse_source_config(general(**keys), "src") == SourceConfig()
    assert f"pythonExecConfig.general.{named}" in caplog.text


def test_query_limit_jitter_stays_within_ten_percent_and_spreads():
    rng = random.Random(11)
    limits = [jittered(1000, rng) for _ in range(500)]
    assert min(limits) >= 900 and max(limits) <= 1100
    assert len(set(limits)) > 50                 # workers started together do not all retire together
    assert jittered(0, rng) == 0                 # never stays never
    assert all(jittered(1, rng) >= 1 for _ in range(100))


def test_a_worker_retires_once_at_its_query_limit():
    budget = RecyclePolicy(max_queries=10).budget(random.Random(3))
    assert 9 <= budget.query_limit <= 11
    verdicts = [budget.after_query() for _ in range(budget.query_limit + 5)]
    assert verdicts[budget.query_limit - 1] is RecycleReason.QUERIES
    assert verdicts.count(RecycleReason.QUERIES) == 1 and set(verdicts) == {None, RecycleReason.QUERIES}
    assert budget.retiring is RecycleReason.QUERIES


def test_a_worker_retires_once_past_its_memory_limit():
    budget = RecyclePolicy(max_memory_bytes=100 * 2 ** 20).budget()
    assert budget.query_limit == 0 and budget.policy.watches_memory
    assert budget.after_query(50 * 2 ** 20) is None
    assert budget.after_query(None) is None            # unknown: no verdict
    assert budget.after_query(100 * 2 ** 20) is None   # at the limit is within it
    assert budget.after_query(101 * 2 ** 20) is RecycleReason.MEMORY
    assert budget.after_query(500 * 2 ** 20) is None   # retiring already


def test_no_limits_never_retire():
    budget = RecyclePolicy().budget()
    assert not budget.policy.watches_memory
    assert all(budget.after_query(2 ** 40) is None for _ in range(10_000))


def test_resident_bytes_reads_a_process_memory():
    mine = resident_bytes(os.getpid())
    assert mine is not None and 5 * 2 ** 20 < mine < 2 ** 34
    grown = b"\x01" * (64 * 2 ** 20)      # written, so resident
    assert resident_bytes(os.getpid()) > mine + 32 * 2 ** 20
    del grown
    assert resident_bytes(2 ** 22 + 12345) is None     # no such process
