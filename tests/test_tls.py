"""TLS against a real TLS server on loopback, with a certificate authority made in the test (trustme)."""
import asyncio
import json
import ssl

import pytest
import trustme

from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.devserver import DevServer
from pyexec_connector.link import ConnectionFailed

from .conftest import SOURCE, TOKEN


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def tls_server(ca, *names: str) -> DevServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    server = DevServer(token=TOKEN, sources=(SOURCE,))
    await server.start(ssl=context)
    return server


@pytest.fixture
async def tls(ca):
    server = await tls_server(ca)
    yield server
    await server.stop()


class Run:
    def __init__(self, server: DevServer, **props):
        values = {"targetServer": server.url, "authToken": TOKEN, "sources": SOURCE}
        values.update({k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in props.items()})
        self.connector = Connector(build_server_config(values, env={}), backoff_initial=0.02, backoff_max=0.2,
                                   handshake_timeout=2.0)

    async def __aenter__(self):
        self.task = asyncio.create_task(self.connector.run())
        return self.connector

    async def __aexit__(self, *exc):
        self.connector.stop()
        await asyncio.wait_for(asyncio.gather(self.task, return_exceptions=True), 10)


async def test_verified_with_the_ca_supplied(tls, ca_file):
    assert tls.url.startswith("https://")
    async with Run(tls, connectKWArgs={"caFile": ca_file}) as connector:
        await connector.wait_ready(timeout=10)
        assert connector.config.websocket_url.startswith("wss://")
        assert (await tls.query({"code": "x = 1"})).results == {"x": 1}
        tls.put_document("s.py", "fetched = True")        # documents over https, with the same CA
        assert (await tls.query({"script": "s.py"})).results == {"fetched": True}


async def test_fails_clearly_without_the_ca(tls, caplog):
    async with Run(tls) as connector:
        for _ in range(300):
            if connector.sessions[SOURCE].link.reconnects >= 2:
                break
            await asyncio.sleep(0.02)
        assert not connector.ready and tls.validations == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "failed" in r.getMessage()]
    assert lines, "no warning logged"
    assert "TLS certificate verification failed" in lines[0] and "caFile" in lines[0]
    assert len(lines) == 1                             # the same problem again is not repeated at WARNING


async def test_fail_on_connection_error_names_the_certificate_problem(tls):
    connector = Run(tls, failOnConnectionError="true").connector
    with pytest.raises(ConnectionFailed, match="TLS certificate verification failed"):
        await asyncio.wait_for(connector.run(), 10)


async def test_name_mismatch_is_a_certificate_problem(ca, ca_file, caplog):
    server = await tls_server(ca, "elsewhere.example")
    try:
        async with Run(server, connectKWArgs={"caFile": ca_file}) as connector:
            for _ in range(300):
                if connector.sessions[SOURCE].link.reconnects >= 1:
                    break
                await asyncio.sleep(0.02)
            assert not connector.ready
        assert any("TLS certificate verification failed" in r.getMessage() and "mismatch" in r.getMessage()
                   for r in caplog.records)
    finally:
        await server.stop()


async def test_disable_ssl_verification(tls):
    async with Run(tls, connectKWArgs={"disableSslVerification": True}) as connector:
        await connector.wait_ready(timeout=10)
        assert (await tls.query({"code": "x = 2"})).results == {"x": 2}
        tls.put_document("s.py", "fetched = True")
        assert (await tls.query({"script": "s.py"})).results == {"fetched": True}
