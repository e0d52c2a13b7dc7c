"""A plain query leaves no reference cycle behind: what it made is freed as soon as it ends, not by the
collector (which would then run every few hundred queries, before some query's reply)."""
import gc

from pyexec_connector.cache import CodeCache
from pyexec_connector.engine.base import Job
from pyexec_connector.engine.runtime import start_job
from pyexec_connector.reply import ReplyChannel
from pyexec_connector.request import parse_query


def _run_once(cache: CodeCache) -> str:
    request = parse_query({"name": "n", "code": "y = x + 1\ncontext_seen = connector_context['source_name']",
                           "presetValues": {"x": 1}})
    channel = ReplyChannel(lambda frame: None, "reply-address", "source")
    outcome = start_job(cache, Job(request, request.code, request.code, False), None, channel)
    return outcome.results_json


def test_a_plain_run_leaves_nothing_for_the_collector():
    cache = CodeCache()
    _run_once(cache)            # compiled and cached: what stays is the cache's
    gc.collect()
    gc.disable()
    try:
        assert _run_once(cache) == '{"x":1,"y":2,"context_seen":"source"}'
        assert gc.collect() == 0
    finally:
        gc.enable()
