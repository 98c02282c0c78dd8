"""The LLM transport: one chat completion at a time, with the run's only retry layer.

Any OpenAI-compatible endpoint works (DeepSeek, OpenAI, vLLM, llama.cpp, Ollama). The openai SDK
is built with ``max_retries=0`` so that retries happen here and nowhere else: exponential
backoff with full jitter, a server's ``Retry-After`` (seconds or an HTTP date, or
``retry-after-ms``) taking precedence on 429/503. What is retried: 408, 409, 429, 5xx,
timeouts, connection errors and bodies that are not a chat completion. What is not:

* 401, 402, 403, 404: every later request would fail the same way, so :class:`FatalLLMError`
  (a UserError) stops the run at once;
* other 4xx (400 context too long, 413, 422): :class:`RequestRejected`, this request only.

Exhausted retries raise :class:`RequestFailed`. Concurrency is bounded by slots held only while
an attempt is on the wire (a request sleeping in backoff does not block others). The bytes go
through :class:`augment.transport.LeanTransport` (httpx's own transport when an environment
proxy applies), which costs a third of the CPU per request of httpx's default pool.

The API key is passed to the SDK and nowhere else; error text from the server is redacted in
case it echoes the key back.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx2
import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from anchoralign.errors import UserError
from augment.transport import LeanTransport, wants_default_transport, within

# A server asking for a longer pause than this is treated as asking for this long: a run should
# not sleep for an hour on one header.
MAX_RETRY_AFTER_S = 300.0
FATAL_STATUSES = frozenset({401, 402, 403, 404})
CONNECT_CHECK_S = 15.0  # how long the first connection may take before the endpoint is called unreachable
T = TypeVar("T")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def cost_usd(usage: Usage, price_in: float | None, price_out: float | None) -> float | None:
    """Cost from prices in USD per million tokens; None when no price is known."""
    if price_in is None and price_out is None:
        return None
    return (usage.prompt_tokens * (price_in or 0.0) + usage.completion_tokens * (price_out or 0.0)) / 1e6


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage
    latency_s: float  # of the successful attempt
    attempts: int


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    model: str
    concurrency: int = 32
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    temperature: float = 1.0
    max_tokens: int = 1024


class LLMError(Exception):
    """A request that did not produce an answer."""


class RequestRejected(LLMError):
    """The server refused this request for a reason that a retry cannot fix (e.g. HTTP 400)."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


class RequestFailed(LLMError):
    """Every attempt failed; ``connection`` is True when the last failure never reached a server."""

    def __init__(self, message: str, attempts: int, connection: bool):
        self.message = message
        self.attempts = attempts
        self.connection = connection
        super().__init__(f"{message} (after {attempts} attempt{'s' if attempts != 1 else ''})")


class FatalLLMError(UserError):
    """A failure that every later request would repeat (bad key, unknown model): stop the run."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, connection: bool = False):
        self.message = message
        self.retry_after = retry_after
        self.connection = connection
        super().__init__(message)


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[float, float], float]) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^(attempt-1))]."""
    return rng(0.0, min(cap, base * 2.0 ** (attempt - 1)))


def parse_retry_after(headers: Any, now: datetime | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date), or None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def parse_completion(content: bytes) -> tuple[str, str | None, Usage]:
    """(answer text, finish_reason, usage) from a chat-completion body; ValueError if it is not one."""
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"response body is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError("response body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("response has no choices")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise ValueError("response choice has no message content")
    usage_obj = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    usage = Usage(int(usage_obj.get("prompt_tokens") or 0), int(usage_obj.get("completion_tokens") or 0))
    finish = choices[0].get("finish_reason")
    return text, finish if isinstance(finish, str) else None, usage


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        return text.replace(secret, "***")
    return text


class LLMClient:
    """Async chat completions with bounded concurrency and one retry layer (see module doc)."""

    def __init__(self, settings: ClientSettings, api_key: str, rng: random.Random | None = None):
        self.settings = settings
        self._key = api_key
        self._rng = rng or random.Random()
        # Bounds the attempts on the wire (not the requests: one sleeping in backoff holds no
        # slot), and so the connections the transport keeps open.
        self._slots = asyncio.Semaphore(settings.concurrency)
        transport = None if wants_default_transport(settings.base_url) else LeanTransport()
        http = httpx2.AsyncClient(
            transport=transport,
            limits=httpx2.Limits(
                max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
            ),
            timeout=httpx2.Timeout(settings.timeout_s),
        )
        self._transport = transport
        self._sdk = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=settings.base_url,
            max_retries=0,
            timeout=settings.timeout_s,
            http_client=http,
        )

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._sdk.close()

    async def check_reachable(self, timeout_s: float = CONNECT_CHECK_S) -> None:
        """Fail at once, with one clear message, when the endpoint cannot be reached at all
        (refused, unknown host, TLS refused): otherwise every request would go through all its
        retries first, a minute or more, before the run could say so. Behind a proxy the
        connection is the proxy's business, so nothing is checked."""
        if self._transport is None:
            return
        try:
            await self._transport.connect(self.settings.base_url, min(timeout_s, self.settings.timeout_s))
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.UnsupportedProtocol) as err:
            raise FatalLLMError(
                redact(
                    f"cannot connect to {self.settings.base_url} ({err}); check --base-url and the network",
                    self._key,
                )
            ) from None

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int | None = None, temperature: float | None = None
    ) -> Completion:
        """One chat completion; ``max_tokens`` and ``temperature`` override the settings for it."""
        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    text, finish, usage, latency = await self._attempt(messages, max_tokens, temperature)
                    return Completion(text, finish, usage, latency, attempts)
        except _Retryable as err:
            raise RequestFailed(err.message, attempts, err.connection) from None
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER_S)
        return backoff_delay(
            state.attempt_number, self.settings.backoff_s, self.settings.backoff_max_s, self._rng.uniform
        )

    async def _attempt(
        self, messages: list[dict[str, str]], max_tokens: int | None = None, temperature: float | None = None
    ) -> tuple[str, str | None, Usage, float]:
        s = self.settings
        async with self._slots:
            start = time.perf_counter()
            try:
                # The SDK's timeout is per read; this bounds the whole exchange, trickling included.
                content = await within(s.timeout_s, self._post(messages, max_tokens, temperature))
            except asyncio.TimeoutError:
                raise _Retryable(f"no answer within {s.timeout_s:g} s") from None
            except openai.APITimeoutError:
                raise _Retryable(f"no answer within {s.timeout_s:g} s") from None
            except openai.APIConnectionError as err:
                raise _Retryable(self._describe_connection(err), connection=True) from None
            except openai.APIStatusError as err:
                raise self._classify_status(err) from None
            except httpx2.TransportError as err:  # a body cut off mid-read surfaces below the SDK
                raise _Retryable(
                    f"connection broken while reading the answer ({type(err).__name__})"
                ) from None
            latency = time.perf_counter() - start
        try:
            text, finish, usage = parse_completion(content)
        except ValueError as err:
            raise _Retryable(f"unusable response from {s.base_url}: {err}") from None
        return text, finish, usage, latency

    async def _post(
        self, messages: list[dict[str, str]], max_tokens: int | None = None, temperature: float | None = None
    ) -> bytes:
        s = self.settings
        body = {
            "model": s.model,
            "messages": messages,
            "temperature": s.temperature if temperature is None else temperature,
            "max_tokens": s.max_tokens if max_tokens is None else max_tokens,
        }
        # The SDK's generic POST (its documented way to reach any endpoint): the same auth, base
        # URL and error classes as chat.completions.create. The body goes as ready JSON bytes:
        # the typed-parameter conversion and the deep copy of a dict body cost more CPU than the
        # rest of a request. The answer is read by parse_completion, so a malformed body is a
        # retryable fault, not a crash.
        response = await self._sdk.post(
            "/chat/completions",
            content=json.dumps(body, ensure_ascii=False).encode("utf-8"),
            options={"headers": {"Content-Type": "application/json"}},
            cast_to=httpx2.Response,
        )
        return response.content

    def _describe_connection(self, err: openai.APIConnectionError) -> str:
        cause = err.__cause__ or err.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause else str(err)
        return redact(f"cannot connect to {self.settings.base_url} ({detail})", self._key)

    def _classify_status(self, err: openai.APIStatusError) -> Exception:
        status = err.status_code
        message = redact(_server_message(err), self._key)
        if status in FATAL_STATUSES:
            hint = {
                401: "the API key was refused",
                402: "the account cannot pay for requests",
                403: "access is forbidden for this key",
                404: f"the endpoint or model '{self.settings.model}' was not found",
            }[status]
            return FatalLLMError(f"{self.settings.base_url} answered HTTP {status}: {hint} ({message})")
        if status in (408, 409, 429) or status >= 500:
            return _Retryable(
                f"HTTP {status}: {message}", retry_after=parse_retry_after(err.response.headers)
            )
        return RequestRejected(status, message)


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return str(err.message)
