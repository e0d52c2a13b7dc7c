"""Scripts stored as Vantiq documents, fetched from devserver.py's REST endpoints."""
import pytest

from pyexec_connector import errors
from pyexec_connector.documents import DocumentStore

from .conftest import SOURCE, TOKEN


async def test_download_skipped_while_current(server, start_connector):
    server.set_source_config(SOURCE, {"returnRuntimeInformation": True})
    await start_connector()
    server.put_document("s.py", "v = 1", modified="2026-01-01T00:00:00Z")
    first = await server.query({"script": "s.py"})
    assert first.results == {"v": 1} and first.body["connectorRuntimeInfo"]["newCacheEntry"] is True
    second = await server.query({"script": "s.py", "name": "s.py"})
    assert second.body["connectorRuntimeInfo"]["using_cached"] is True
    assert server.document_requests == ["meta:s.py", "content:s.py", "meta:s.py"]
    # a new modification time: downloaded and compiled again
    server.put_document("s.py", "v = 2", modified="2026-01-02T00:00:00Z")
    third = await server.query({"script": "s.py"})
    assert third.results == {"v": 2} and third.body["connectorRuntimeInfo"]["using_cached"] is False
    assert server.document_requests[-2:] == ["meta:s.py", "content:s.py"]


async def test_created_at_is_the_fallback_fingerprint(server):
    store = DocumentStore(server.url, TOKEN)
    try:
        server.put_document("d.py", "x = 1", modified="t1")
        script = await store.get("d.py")
        assert script.modified == "t1" and script.text == "x = 1"
    finally:
        await store.close()


async def test_missing_document_gives_the_server_code(connected):
    server, _ = connected
    result = await server.query({"script": "nope.py"})
    assert result.status == 400
    assert result.error_code == "io.vantiq.resource.not.found"
    assert result.body["parameters"] == ["nope.py"]


@pytest.mark.parametrize("kwargs, text, code", [
    ({"incomplete": True}, "x = 1", errors.DOC_INCOMPLETE),
    ({"content_size": 999}, "x = 1", errors.DOC_LENGTH),
    ({}, "   \n", errors.DOC_EMPTY),
])
async def test_bad_documents(connected, kwargs, text, code):
    server, _ = connected
    server.put_document("bad.py", text, **kwargs)
    assert (await server.query({"script": "bad.py"})).error_code == code


async def test_bad_token_for_documents(server):
    store = DocumentStore(server.url, "wrong-token")
    server.put_document("d.py", "x = 1")
    try:
        with pytest.raises(errors.QueryError) as info:
            await store.get("d.py")
        assert info.value.code == "io.vantiq.authentication.failed"
    finally:
        await store.close()


async def test_unreachable_document_server():
    store = DocumentStore("http://127.0.0.1:9", "t", timeout=2)
    try:
        with pytest.raises(errors.QueryError) as info:
            await store.get("d.py")
        assert info.value.code == errors.DOC_FETCH
    finally:
        await store.close()


async def test_one_session_per_source_closed_on_shutdown(connected):
    server, running = connected
    server.put_document("s.py", "v = 1")
    await server.query({"script": "s.py"})
    store = running.session.documents
    assert store.session_open and store.sessions_opened == 1
    await server.query({"script": "s.py"})
    assert store.session_open and store.sessions_opened == 1
    await running.stop()
    assert not store.session_open
