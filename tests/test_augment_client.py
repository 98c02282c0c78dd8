"""The LLM client: retry policy, Retry-After, error classes, usage, against a loopback server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from augment.client import (
    ClientSettings,
    FatalLLMError,
    LLMClient,
    RequestFailed,
    RequestRejected,
    Usage,
    backoff_delay,
    cost_usd,
    parse_completion,
    parse_retry_after,
    redact,
)
from augment.scripted_server import Reply, ScriptedServer

MESSAGES = [{"role": "user", "content": 'Rewrite:\n{"Peop": "Ann Lee"} works for {"Org": "Acme"} .'}]
KEY = "sk-test-client-0123456789"


# -- pure functions -----------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap():
    upper = lambda lo, hi: hi  # noqa: E731 - the rng's largest draw
    assert [backoff_delay(n, 0.5, 3.0, upper) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(3, 0.5, 3.0, lambda lo, hi: lo) == 0.0


def test_retry_after_seconds_date_and_milliseconds():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 12:00:30 GMT"}, now) == 30.0
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 11:00:00 GMT"}, now) == 0.0  # in the past
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_parse_completion_reads_text_finish_and_usage():
    body = b'{"choices":[{"message":{"content":"1. x"},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":5}}'
    assert parse_completion(body) == ("1. x", "length", Usage(12, 5))
    for garbage in (b"<html>", b"[]", b'{"choices": []}', b'{"choices":[{"message":{}}]}'):
        with pytest.raises(ValueError):
            parse_completion(garbage)


def test_cost_from_prices_per_million_tokens():
    assert cost_usd(Usage(2_000_000, 500_000), 0.27, 1.10) == pytest.approx(0.54 + 0.55)
    assert cost_usd(Usage(10, 10), None, None) is None
    assert cost_usd(Usage(1_000_000, 1_000_000), None, 2.0) == pytest.approx(2.0)


def test_redact_hides_the_key():
    assert redact(f"bad key {KEY}!", KEY) == "bad key ***!"


# -- against the loopback server ----------------------------------------------------------------


def _complete(url: str, key: str = KEY, messages=MESSAGES, **settings):
    async def go():
        defaults = dict(timeout_s=2.0, max_retries=3, backoff_s=0.01, backoff_max_s=0.05)
        async with LLMClient(ClientSettings(base_url=url, model="m", **{**defaults, **settings}), key) as c:
            return await c.complete(messages)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "fault",
    [
        Reply(status=429, message="slow down"),
        Reply(status=500),
        Reply(status=503),
        Reply(status=408),
        Reply(drop=True),
        Reply(body=b"<html>gateway</html>"),
        Reply(body=b'{"choices": []}'),
        Reply(text="late", delay=0.6),
    ],
    ids=["429", "500", "503", "408", "dropped", "garbage", "no-choices", "too-slow"],
)
def test_transient_faults_are_retried_until_an_answer(fault):
    def script(body, attempt):
        return fault if attempt <= 2 else Reply(text="1. fine")

    with ScriptedServer(script) as srv:
        got = _complete(srv.url, timeout_s=0.3)
    assert got.text == "1. fine"
    assert got.attempts == 3
    assert got.usage.completion_tokens > 0
    assert sorted(r.attempt for r in srv.requests) == [1, 2, 3]


def test_retry_after_is_honoured_instead_of_the_backoff():
    def script(body, attempt):
        if attempt == 1:
            return Reply(status=429, headers={"Retry-After": "1"})
        return Reply(text="1. ok")

    with ScriptedServer(script) as srv:
        got = _complete(srv.url, backoff_s=30.0, backoff_max_s=30.0)
    gap = srv.requests[1].time - srv.requests[0].time
    assert got.attempts == 2
    assert 0.9 <= gap < 5.0  # the header's 1 s, not a backoff of up to 30 s


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refused_request_is_not_retried(status):
    script = lambda body, attempt: Reply(status=status, message="context too long")  # noqa: E731
    with ScriptedServer(script) as srv, pytest.raises(RequestRejected) as err:
        _complete(srv.url)
    assert err.value.status == status
    assert "context too long" in err.value.message
    assert len(srv.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_missing_model_stop_at_once_without_leaking_the_key(status):
    echo = f"Incorrect API key provided: {KEY}"
    with (
        ScriptedServer(lambda body, attempt: Reply(status=status, message=echo)) as srv,
        pytest.raises(FatalLLMError) as err,
    ):
        _complete(srv.url)
    assert len(srv.requests) == 1
    assert f"HTTP {status}" in str(err.value)
    assert KEY not in str(err.value)
    assert srv.requests[0].authorization == f"Bearer {KEY}"  # the key did reach the server


def test_retries_are_bounded_and_reported():
    with (
        ScriptedServer(lambda body, attempt: Reply(status=500, message="down")) as srv,
        pytest.raises(RequestFailed) as err,
    ):
        _complete(srv.url, max_retries=2)
    assert len(srv.requests) == 3
    assert err.value.attempts == 3
    assert not err.value.connection
    assert "HTTP 500" in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_a_connection_failure():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(RequestFailed) as err:
        _complete(url, max_retries=1)
    assert err.value.connection
    assert url in str(err.value)


@pytest.mark.parametrize("concurrency", [3, 20])  # one connection pool, and several (8 + 8 + 4)
def test_concurrency_is_bounded_and_reached(concurrency):
    active = 0
    peak = 0
    lock = threading.Lock()

    def script(body, attempt):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return Reply(text="1. ok")

    async def go(url):
        settings = ClientSettings(base_url=url, model="m", concurrency=concurrency, timeout_s=5.0)
        async with LLMClient(settings, KEY) as c:
            msgs = [[{"role": "user", "content": f"sentence {i}"}] for i in range(4 * concurrency)]
            return await asyncio.gather(*(c.complete(m) for m in msgs))

    with ScriptedServer(script) as srv:
        answers = asyncio.run(go(srv.url))
    assert len(answers) == 4 * concurrency
    assert peak == concurrency
