"""tower_aoai.AsyncTransport under the real openai SDK (async), against the scripted local server."""

from __future__ import annotations

import socket
from collections.abc import Callable
import threading

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam
import pytest
from conftest import (
    AsyncFakeSleep,
    Reply,
    ScriptedServer,
    blocked,
    chat_completion,
    http_date,
    server_error,
    sse_stream,
    throttle,
)

import tower_aoai

pytestmark = pytest.mark.anyio

API_KEY = "sk-test-secret-do-not-log"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def azure(server: ScriptedServer, transport: tower_aoai.AsyncTransport) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=server.url,
        api_key=API_KEY,
        api_version="2024-10-21",
        http_client=httpx2.AsyncClient(transport=transport),
    )


async def chat(client: openai.AsyncAzureOpenAI | openai.AsyncOpenAI) -> str | None:
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


@pytest.mark.parametrize(
    ("reply", "low", "high"),
    [
        (lambda: throttle(retry_after_ms="250"), 0.25, 0.275),
        (lambda: throttle(retry_after="2"), 2.0, 2.2),
        # HTTP dates have one-second resolution.
        (lambda: throttle(retry_after=http_date(30)), 28.0, 33.0),
        (lambda: throttle(x_ratelimit_reset_tokens="1m"), 0.0, 0.0),  # longer than max_wait: give up
        (lambda: throttle(x_ratelimit_reset_requests="200ms"), 0.2, 0.22),
    ],
    ids=["retry-after-ms", "retry-after", "http-date", "reset-too-long", "reset-requests"],
)
async def test_waits_the_servers_hint(
    server: ScriptedServer, async_sleep: AsyncFakeSleep, reply: Callable[[], Reply], low: float, high: float
) -> None:
    server.play(reply(), chat_completion("after the wait"))
    async with azure(server, tower_aoai.AsyncTransport(sleep=async_sleep, max_wait=59.0)) as client:
        if high == 0.0:
            with pytest.raises(openai.RateLimitError):
                await chat(client)
            assert len(server.hits) == 1
            assert async_sleep.waits == []
            return
        assert await chat(client) == "after the wait"
    assert len(server.hits) == 2
    assert len(async_sleep.waits) == 1
    # The backend cools down from the response; the wait is asked a little later.
    assert low - 0.03 <= async_sleep.waits[0] <= high


async def test_without_a_hint_cools_down_or_backs_off(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    # A 429 without a hint cools the backend down for the default 10 s; a 5xx backs off.
    server.play(throttle(message="no hint here"), server_error(), chat_completion())
    async with azure(server, tower_aoai.AsyncTransport(sleep=async_sleep, backoff_base=0.2, backoff_cap=0.3)) as client:
        await chat(client)
    assert len(server.hits) == 3
    assert 9.99 <= async_sleep.waits[0] <= 11.0
    assert all(0.0 <= w <= 0.3 for w in async_sleep.waits[1:])


async def test_gives_up_with_exactly_max_attempts_hits(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    server.play(throttle(retry_after_ms="1000"))
    async with azure(server, tower_aoai.AsyncTransport(sleep=async_sleep, max_attempts=4)) as client:
        assert client.max_retries == 2
        with pytest.raises(openai.RateLimitError) as raised:
            await chat(client)
    assert len(server.hits) == 4
    assert len(async_sleep.waits) == 3
    assert raised.value.response.headers["x-should-retry"] == "false"


async def test_blocked_is_returned_at_once(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    server.play(blocked())
    async with azure(server, tower_aoai.AsyncTransport(sleep=async_sleep)) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await chat(client)
    assert len(server.hits) == 1
    assert async_sleep.waits == []


async def test_streams_chunk_by_chunk(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    gate = threading.Event()
    server.play(throttle(retry_after_ms="200"), sse_stream(["a", "b", "c"], gate=gate))
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1",
        api_key=API_KEY,
        http_client=httpx2.AsyncClient(transport=tower_aoai.AsyncTransport(sleep=async_sleep)),
    )
    async with client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        words: list[str | None] = []
        async for chunk in stream:
            if not words:
                assert not server.stream_finished.is_set()
                gate.set()
            if chunk.choices:
                words.append(chunk.choices[0].delta.content)
    assert words == ["a", "b", "c"]
    assert len(server.hits) == 2
    assert len(async_sleep.waits) == 1


async def test_a_large_error_body_is_returned_whole(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    big = b'{"error":{"code":"503","message":"' + b"y" * 50_000 + b'"}}'
    server.play(Reply(503, {"content-type": "application/json"}, big))
    transport = tower_aoai.AsyncTransport(sleep=async_sleep, max_attempts=2)
    async with httpx2.AsyncClient(transport=transport) as client:
        response = await client.post(server.url + "/x", content=b"{}")
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false"
    assert response.content == big


async def test_connection_errors_are_retried_then_raised(async_sleep: AsyncFakeSleep) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = tower_aoai.AsyncTransport(sleep=async_sleep, max_attempts=2, backoff_base=0.1, backoff_cap=0.1)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")
    # Full jitter: the drawn backoff may already have passed when the next attempt is asked.
    assert len(async_sleep.waits) <= 1


async def test_one_engine_shared_by_two_transports_shares_the_budget(
    server: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    # A budget with no reserve and no ratio allows no retry at all, across both transports.
    engine = tower_aoai.Engine(budget_min_per_sec=0, budget_ratio=0.0)
    server.play(server_error())
    for transport in (
        tower_aoai.AsyncTransport(engine=engine, sleep=async_sleep),
        tower_aoai.AsyncTransport(engine=engine, sleep=async_sleep),
    ):
        async with httpx2.AsyncClient(transport=transport) as client:
            response = await client.get(server.url + "/b")
        assert response.status_code == 500
        assert response.headers["x-should-retry"] == "false"
    assert len(server.hits) == 2
    assert async_sleep.waits == []


async def test_default_sleep_is_asyncio_sleep(server: ScriptedServer) -> None:
    server.play(throttle(retry_after_ms="20"), chat_completion())
    async with azure(server, tower_aoai.AsyncTransport()) as client:
        await chat(client)
    assert len(server.hits) == 2
    assert server.waits()[0] >= 0.02


async def test_aclose_closes_the_inner_transport() -> None:
    closed = []

    class Inner(httpx2.AsyncBaseTransport):
        async def aclose(self) -> None:
            closed.append(True)

    async with tower_aoai.AsyncTransport(Inner()):
        pass
    assert closed == [True]


async def test_legacy_async_httpx_transport(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    import httpx

    server.play(server_error(), chat_completion("legacy async"))
    async with httpx.AsyncClient(transport=tower_aoai.AsyncHttpxTransport(sleep=async_sleep)) as client:
        response = await client.post(server.url + "/c", json={})
    assert response.json()["choices"][0]["message"]["content"] == "legacy async"
    assert len(server.hits) == 2
    assert len(async_sleep.waits) <= 1  # a full-jitter backoff may draw (almost) nothing


async def test_an_error_body_that_stalls_cannot_hold_the_call(server: ScriptedServer) -> None:
    # A 429 whose body stops after its first chunk: the server holds the rest until `gate` (or
    # its own 5 s). The call must come back on its own deadline with what arrived, not wait.
    gate = threading.Event()
    first = b'{"error":{"code":"429",'
    server.play(Reply(429, {"content-type": "application/json"}, chunks=[first, b'"message":"x"}}'], gate=gate))
    transport = tower_aoai.AsyncTransport(max_attempts=1, deadline=0.3)
    try:
        async with httpx2.AsyncClient(transport=transport) as client:
            response = await client.post(f"{server.url}/openai/deployments/gpt-4o/chat/completions", content=b"{}")
            assert response.status_code == 429
            assert response.headers["x-should-retry"] == "false"
            assert response.content == first
            # It returned while the server was still holding the rest of the body.
            assert not gate.is_set()
            assert not server.stream_finished.is_set()
    finally:
        gate.set()
