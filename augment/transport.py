"""A lean HTTP/1.1 transport for the openai SDK's HTTP client: keep-alive connections on
asyncio streams, and nothing else.

Why: a corpus run sends thousands of small requests at high concurrency. Through the default
stack (httpx's connection pool on httpcore, anyio and h11) one request costs about 1.5 ms of CPU
in the client process, more than the rest of the runner together; on a small machine that CPU,
not the server, sets the pace. This transport plugs into ``httpx.AsyncClient(transport=...)``,
the documented extension point, so the SDK keeps doing everything it does (URL, auth headers,
error classes) and only the bytes on the wire are handled here, at about a third of the cost.

What it supports is what OpenAI-compatible endpoints use: HTTP/1.1 over TCP or TLS (SNI and
certificate checks by the SSL context given, httpx's by default), bodies framed by ``Content-Length``, chunked or
read to the end, keep-alive with an idle expiry, and ``Connection: close``. Compressed bodies
are decoded by httpx's ``Response`` as usual. Proxies are not: :func:`wants_default_transport`
tells the client to keep httpx's own transport when an environment proxy applies.

Errors are httpx's: ``ConnectError``/``ConnectTimeout`` before the request is written,
``WriteError``/``WriteTimeout`` while writing, ``ReadTimeout`` when the whole answer (not one
read, as in httpx: an LLM writes nothing until it is done) takes longer than the read timeout,
``RemoteProtocolError`` for a connection closed early or a malformed response. A request on a
reused keep-alive connection that the server had already closed is sent once more on a new
connection (no byte of an answer was read, so nothing is counted twice), as browsers and httpx
do.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
import urllib.request
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx2

T = TypeVar("T")
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_HEAD_BYTES = 64 * 1024  # status line and headers; a longer head is not an HTTP answer
BODYLESS_STATUSES = frozenset({204, 304})


def wants_default_transport(base_url: str) -> bool:
    """True when an environment proxy (``HTTPS_PROXY`` etc., not bypassed by ``NO_PROXY``)
    applies to ``base_url``: httpx's own transport honours it, this one does not."""
    url = httpx2.URL(base_url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        # at_eof: the server closed it while idle (the loop has seen its FIN).
        return now - self.idle_since < expiry and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A reused connection turned out closed before any byte of the answer arrived."""


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable`` bounded in time; asyncio.timeout (3.11+) does it without wait_for's extra task."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


async def _bounded(seconds: float | None, awaitable: Awaitable[T], error: type[Exception], what: str) -> T:
    """:func:`within`, raising ``error`` (an httpx timeout class) on expiry; None: no bound."""
    if seconds is None:
        return await awaitable
    try:
        return await within(seconds, awaitable)
    except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
        raise error(f"{what} took longer than {seconds:g} s") from None


class LeanTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport (see the module doc). The caller bounds concurrency; the
    transport opens a connection whenever no idle one is free and keeps every one it can reuse."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, keepalive_expiry: float = 15.0):
        self._ssl = ssl_context
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._active: set[_Connection] = set()
        self.connections_opened = 0  # for tests and diagnostics

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme '{url.scheme}'", request=request)
        origin = (url.scheme, url.host, url.port or DEFAULT_PORTS[url.scheme])
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        payload = _serialise(request, await _body(request))
        conn = self._reusable(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, origin, request, payload, timeouts, reused=True)
            except _Stale:
                pass  # the server had closed it; once more on a fresh connection
        conn = await self._open(origin, timeouts.get("connect"), request)
        try:
            return await self._exchange(conn, origin, request, payload, timeouts, reused=False)
        except _Stale:
            raise httpx2.RemoteProtocolError(
                "server disconnected without sending a response", request=request
            ) from None

    async def connect(self, url: str, timeout: float) -> None:
        """Open a connection to ``url``'s origin (TCP, and TLS for https) and keep it for the
        next request; raises ``ConnectError``/``ConnectTimeout`` like a request would."""
        parsed = httpx2.URL(url)
        if parsed.scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme '{parsed.scheme}'")
        origin = (parsed.scheme, parsed.host, parsed.port or DEFAULT_PORTS[parsed.scheme])
        conn = await self._open(origin, timeout, httpx2.Request("GET", parsed))
        conn.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        for conn in list(self._active):
            conn.close()
        self._active.clear()

    # -- connections

    def _reusable(self, origin: tuple[str, str, int]) -> _Connection | None:
        pool = self._idle.get(origin)
        now = time.monotonic()
        while pool:
            conn = pool.pop()  # the most recently used: least likely to have been closed
            if conn.usable(now, self._expiry):
                return conn
            conn.close()
        return None

    async def _open(
        self, origin: tuple[str, str, int], timeout: float | None, request: httpx2.Request
    ) -> _Connection:
        scheme, host, port = origin
        tls: dict[str, Any] = {}
        if scheme == "https":
            if self._ssl is None:
                # httpx's trust store, built on first use: importing it costs ~0.15 s, which a
                # run against a plain-http (loopback, vLLM) endpoint should not pay.
                self._ssl = httpx2.create_ssl_context()
            tls = {"ssl": self._ssl, "server_hostname": host}
        try:
            reader, writer = await _bounded(
                timeout,
                asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES, **tls),
                httpx2.ConnectTimeout,
                "connecting",
            )
        except httpx2.ConnectTimeout as err:
            raise httpx2.ConnectTimeout(str(err), request=request) from None
        except OSError as err:  # refused, unreachable, name not resolved, TLS handshake failed
            raise httpx2.ConnectError(f"{type(err).__name__}: {err}", request=request) from None
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def _exchange(
        self,
        conn: _Connection,
        origin: tuple[str, str, int],
        request: httpx2.Request,
        payload: bytes,
        timeouts: dict[str, Any],
        reused: bool,
    ) -> httpx2.Response:
        self._active.add(conn)
        keep = False
        try:
            try:
                conn.writer.write(payload)
                await _bounded(
                    timeouts.get("write"), conn.writer.drain(), httpx2.WriteTimeout, "sending the request"
                )
            except httpx2.WriteTimeout as err:
                raise httpx2.WriteTimeout(str(err), request=request) from None
            except OSError as err:
                if reused:
                    raise _Stale from None
                raise httpx2.WriteError(f"{type(err).__name__}: {err}", request=request) from None
            response, keep = await _bounded(
                timeouts.get("read"),
                _read_response(conn.reader, request, reused),
                httpx2.ReadTimeout,
                "reading the answer",
            )
            return response
        except httpx2.ReadTimeout as err:
            raise httpx2.ReadTimeout(str(err), request=request) from None
        finally:
            # Any way out but a complete answer on a reusable link closes it: a cancelled or
            # failed exchange leaves the stream at an unknown position.
            self._active.discard(conn)
            if keep:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()


async def _body(request: httpx2.Request) -> bytes:
    if isinstance(request.stream, httpx2.ByteStream):
        return bytes(request.content)
    return b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]


def _serialise(request: httpx2.Request, body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
    has_length = False
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"transfer-encoding":
            continue  # the body is sent whole, framed by its length
        has_length = has_length or lower == b"content-length"
        lines.append(name + b": " + value + b"\r\n")
    if body and not has_length:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines) + body


async def _read_response(
    reader: asyncio.StreamReader, request: httpx2.Request, reused: bool
) -> tuple[httpx2.Response, bool]:
    """Read one response; returns it and whether the connection can carry another request.
    Interim 1xx responses (a ``100 Continue`` nobody asked for) are skipped."""
    while True:
        head = await _read_head(reader, request, reused)
        status_line, *header_lines = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx2.RemoteProtocolError(
                f"not an HTTP/1.x status line: {status_line[:80]!r}", request=request
            )
        if not 100 <= int(parts[1]) < 200:
            break
        reused = False  # bytes came back: the connection was alive
    version, status = parts[0], int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx2.RemoteProtocolError(f"malformed header line: {line[:80]!r}", request=request)
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit():
                raise httpx2.RemoteProtocolError(f"bad Content-Length: {value[:40]!r}", request=request)
            length = int(value)
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            close = close and b"keep-alive" not in tokens or b"close" in tokens
    try:
        if request.method == "HEAD" or status in BODYLESS_STATUSES:
            raw = b""
        elif chunked:
            raw = await _read_chunked(reader)
        elif length is not None:
            raw = await reader.readexactly(length)
        else:  # framed by the end of the connection
            raw = await reader.read()
            close = True
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as err:
        raise httpx2.RemoteProtocolError(
            f"connection closed in the middle of the answer ({type(err).__name__})", request=request
        ) from None
    response = httpx2.Response(
        status,
        headers=headers,
        stream=httpx2.ByteStream(raw),
        request=request,
        extensions={"http_version": version, "reason_phrase": parts[2] if len(parts) > 2 else b""},
    )
    return response, not close


async def _read_head(reader: asyncio.StreamReader, request: httpx2.Request, reused: bool) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if reused and not err.partial:
            raise _Stale from None
        raise httpx2.RemoteProtocolError(
            "server disconnected without sending a response", request=request
        ) from None
    except asyncio.LimitOverrunError:
        raise httpx2.RemoteProtocolError("response head is too long", request=request) from None
    except ConnectionError as err:
        if reused:
            raise _Stale from None
        raise httpx2.ReadError(f"{type(err).__name__}: {err}", request=request) from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)  # ValueError: not a chunk size
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields, not used
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
