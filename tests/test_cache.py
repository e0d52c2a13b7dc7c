"""The compiled-code cache: least recently used goes first, entries valid only for their fingerprint."""
from pyexec_connector.cache import CodeCache


def _code(text: str):
    return compile(text, "<test>", "exec")


def test_the_least_recently_used_entry_goes_first():
    cache = CodeCache(2)
    cache.put("a", _code("a = 1"), "a = 1")
    cache.put("b", _code("b = 1"), "b = 1")
    assert cache.get("a", "a = 1") is not None      # a is now the most recently used
    cache.put("c", _code("c = 1"), "c = 1")
    assert "b" not in cache and "a" in cache and "c" in cache
    assert len(cache) == 2 and cache.capacity == 2


def test_replacing_an_entry_makes_it_the_most_recent():
    cache = CodeCache(2)
    cache.put("a", _code("a = 1"), "a = 1")
    cache.put("b", _code("b = 1"), "b = 1")
    cache.put("a", _code("a = 2"), "a = 2")
    cache.put("c", _code("c = 1"), "c = 1")
    assert "b" not in cache and cache.get("a", "a = 2") is not None


def test_an_entry_serves_only_its_own_fingerprint_unless_any_version_is_asked():
    cache = CodeCache()
    cache.put("a", _code("a = 1"), "a = 1")
    assert cache.get("a", "a = 2") is None
    assert cache.get("a", any_version=True) is not None
    assert cache.get("missing") is None
    assert (cache.hits, cache.misses) == (1, 2)
    cache.drop("a")
    assert "a" not in cache
