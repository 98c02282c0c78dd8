"""The lean HTTP/1.1 transport: framing, keep-alive, stale connections, errors, against raw
loopback servers that say exactly the bytes each test needs."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable

import httpx2
import pytest

from augment.scripted_server import ScriptedServer
from augment.transport import LeanTransport, wants_default_transport

# A connection handler gets (reader, writer, connection number from 0) and says what it likes.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return first, headers, body


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def with_server(handler: Handler, test: Callable[[str], Awaitable[None]]) -> None:
    count = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        n, count = count, count + 1
        try:
            await handler(reader, writer, n)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def run(handler: Handler, test: Callable[[str], Awaitable[None]]) -> None:
    asyncio.run(with_server(handler, test))


async def serve_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answers every request on the connection with its own line and the connection number."""
    while True:
        first, _, body = await read_request(reader)
        writer.write(ok(json.dumps({"line": first.decode(), "conn": n, "body": body.decode()}).encode()))
        await writer.drain()


async def answer_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    await read_request(reader)
    await asyncio.sleep(5)


def test_requests_are_serialised_whole_and_connections_kept_alive():
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def handler(reader, writer, n):
        while True:
            req = await read_request(reader)
            seen.append(req)
            writer.write(ok(b'{"conn": %d}' % n))
            await writer.drain()

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            for i in range(5):
                r = await http.post(
                    "/v1/chat?x=1&y=%C3%A9", content=b'{"i": %d}' % i, headers={"Authorization": "Bearer k"}
                )
                assert r.status_code == 200 and r.json() == {"conn": 0}
        assert transport.connections_opened == 1

    run(handler, test)
    first, headers, body = seen[3]
    assert first == b"POST /v1/chat?x=1&y=%C3%A9 HTTP/1.1"
    assert headers[b"authorization"] == b"Bearer k"
    assert headers[b"host"].startswith(b"127.0.0.1:")
    assert body == b'{"i": 3}'


def test_chunked_and_gzip_bodies_are_decoded():
    payload = json.dumps({"answer": "x" * 5000}).encode()
    packed = gzip.compress(payload)

    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n")
        for i in range(0, len(packed), 700):
            piece = packed[i : i + 700]
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        await read_request(reader)  # the connection stays usable after the trailer
        writer.write(ok(b"{}"))
        await writer.drain()

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            r = await http.get("/")
            assert r.json() == json.loads(payload)
            assert (await http.get("/")).json() == {}
        assert transport.connections_opened == 1

    run(handler, test)


def test_a_body_framed_by_the_end_of_the_connection_closes_it():
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b'{"conn": %d}' % n)

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            assert (await http.get("/")).json() == {"conn": 0}
            assert (await http.get("/")).json() == {"conn": 1}
        assert transport.connections_opened == 2

    run(handler, test)


def test_connection_close_and_http_1_0_are_not_reused():
    async def handler(reader, writer, n):
        await read_request(reader)
        if n == 0:
            writer.write(ok(b"{}", b"Connection: close\r\n"))
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await read_request(reader)  # would answer nothing more: a reuse would hang the test

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url, timeout=5) as http:
            for _ in range(3):
                assert (await http.get("/")).status_code == 200
        assert transport.connections_opened == 3

    run(handler, test)


def test_a_reused_connection_closed_by_the_server_is_retried_on_a_new_one():
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(ok(b'{"conn": %d}' % n))
        await writer.drain()
        if n == 0:
            await read_request(reader)  # the second request arrives, then the server hangs up
            writer.transport.abort()
            return
        await serve_forever(reader, writer, n)

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            assert (await http.get("/")).json() == {"conn": 0}
            assert (await http.get("/")).json()["conn"] == 1
        assert transport.connections_opened == 2

    run(handler, test)


def test_idle_connections_expire():
    async def test(url):
        transport = LeanTransport(keepalive_expiry=0.05)
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            await http.get("/")
            await asyncio.sleep(0.1)
            await http.get("/")
        assert transport.connections_opened == 2

    run(serve_forever, test)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"", "without sending a response"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"cut', "in the middle of the answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "in the middle of the answer"),
    ],
)
def test_broken_answers_on_a_fresh_connection_are_protocol_errors(answer, match):
    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def test(url):
        async with httpx2.AsyncClient(transport=LeanTransport(), base_url=url) as http:
            with pytest.raises(httpx2.RemoteProtocolError, match=match):
                await http.get("/")

    run(handler, test)


def test_a_silent_server_is_a_read_timeout_and_the_connection_is_dropped():
    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url, timeout=0.2) as http:
            with pytest.raises(httpx2.ReadTimeout):
                await http.get("/")
        assert not transport._idle.get(("http", "127.0.0.1", int(url.rsplit(":", 1)[1])))

    run(answer_nothing, test)


def test_a_cancelled_request_leaves_no_connection_behind():
    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            task = asyncio.create_task(http.get("/"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not transport._active and not any(transport._idle.values())

    run(answer_nothing, test)


def test_a_refused_connection_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there

    async def test() -> None:
        async with httpx2.AsyncClient(transport=LeanTransport()) as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")

    asyncio.run(test())


def test_the_openai_server_stand_in_is_reached_through_the_transport():
    async def test(url: str) -> None:
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport) as http:
            results = await asyncio.gather(*(http.get(f"{url}/models") for _ in range(8)))
        assert all(r.json()["data"][0]["id"] == "fake" for r in results)
        assert transport.connections_opened == 8  # concurrent requests: one connection each

    with ScriptedServer() as srv:
        asyncio.run(test(srv.url))


def test_an_environment_proxy_keeps_httpx_own_transport(monkeypatch):
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not wants_default_transport("https://api.deepseek.com/v1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert wants_default_transport("https://api.deepseek.com/v1")
    assert not wants_default_transport("http://127.0.0.1:8000/v1")  # plain http: no http proxy set
    monkeypatch.setenv("NO_PROXY", "api.deepseek.com")
    assert not wants_default_transport("https://api.deepseek.com/v1")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_checks_the_certificate_against_the_context(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def test() -> None:
        server = await asyncio.start_server(
            lambda r, w: serve_forever(r, w, 0), "127.0.0.1", 0, ssl=server_tls
        )
        port = server.sockets[0].getsockname()[1]
        try:
            trusting = LeanTransport(ssl.create_default_context(cafile=str(cert)))
            async with httpx2.AsyncClient(transport=trusting) as http:
                r = await http.post(f"https://localhost:{port}/v1/x", content=b"hi")
                assert r.json()["body"] == "hi" and r.json()["line"] == "POST /v1/x HTTP/1.1"
            async with httpx2.AsyncClient(transport=LeanTransport()) as http:
                with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await http.get(f"https://localhost:{port}/")
        finally:
            server.close()

    asyncio.run(test())


def test_a_connection_check_keeps_its_connection_for_the_first_request():
    async def test(url):
        transport = LeanTransport()
        await transport.connect(url + "/v1", timeout=5)
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            assert (await http.get("/v1/models")).json()["conn"] == 0
        assert transport.connections_opened == 1

    run(serve_forever, test)


def test_an_unrequested_100_continue_is_skipped():
    async def handler(reader, writer, n):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"conn": %d}' % n))
            await writer.drain()

    async def test(url):
        transport = LeanTransport()
        async with httpx2.AsyncClient(transport=transport, base_url=url) as http:
            for _ in range(2):
                assert (await http.get("/")).json() == {"conn": 0}
        assert transport.connections_opened == 1

    run(handler, test)


def test_the_client_works_against_a_plain_stdlib_http_1_0_server():
    """The simplest server a user might write: http.server's defaults (HTTP/1.0, one thread,
    no Content-Length, the connection closed after each answer)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from augment.client import ClientSettings, LLMClient

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            text = "echo: " + body["messages"][-1]["content"]
            self.wfile.write(
                json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}).encode()
            )

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        async def go():
            url = f"http://127.0.0.1:{server.server_address[1]}/v1"
            async with LLMClient(ClientSettings(base_url=url, model="m", concurrency=4), "k") as client:
                return await asyncio.gather(
                    *(client.complete([{"role": "user", "content": f"q{i}"}]) for i in range(6))
                )

        answers = asyncio.run(go())
    finally:
        server.shutdown()
        server.server_close()
    assert [a.text for a in answers] == [f"echo: q{i}" for i in range(6)]
    assert all(a.attempts == 1 for a in answers)
