"""tower_aoai.AsyncTransport over several backends (async): failover, 403 isolation, the limiter
under concurrency, cancellation releasing the permit, and pacing, through the real openai SDK."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest
from conftest import AsyncFakeSleep, Reply, ScriptedServer, blocked, chat_completion, throttle
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

pytestmark = pytest.mark.anyio

EAST_KEY = "east-secret-key-0123456789"
WEST_KEY = "west-secret-key-9876543210"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def two(east: ScriptedServer, west: ScriptedServer) -> list[tower_aoai.Backend]:
    return [
        tower_aoai.Backend("east", east.url, deployment="gpt-4o-east", region="eastus2", api_key=EAST_KEY, tier=0),
        tower_aoai.Backend("west", west.url, deployment="gpt-4o-west", region="swedencentral", api_key=WEST_KEY),
    ]


def azure(transport: tower_aoai.AsyncTransport) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint="https://sdk.example",
        api_key="sdk-key",
        api_version="2024-10-21",
        http_client=httpx2.AsyncClient(transport=transport),
    )


async def chat(client: openai.AsyncAzureOpenAI) -> str | None:
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


def in_flight(transport: tower_aoai.AsyncTransport, backend: str = "default") -> int:
    value = transport.stats()["backends"][backend]["gauges"]["in_flight"]
    assert isinstance(value, int)
    return value


async def test_a_429_fails_over_at_once(east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    east.play(throttle(retry_after_ms="5000"))
    async with azure(tower_aoai.AsyncTransport(backends=two(east, west), sleep=async_sleep)) as client:
        assert await chat(client) == "from west"
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert async_sleep.waits == []
    assert east.hits[0].headers["api-key"] == EAST_KEY
    assert west.hits[0].headers["api-key"] == WEST_KEY


async def test_all_blocked_raises_blocked_error(
    east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    east.play(blocked(apim_request_id="e-1"))
    west.play(blocked(apim_request_id="w-1"))
    transport = tower_aoai.AsyncTransport(backends=two(east, west), sleep=async_sleep)
    async with azure(transport) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await chat(client)  # east blocked, failed over, west blocked: its answer is returned
        with pytest.raises(tower_aoai.BlockedError) as raised:
            await chat(client)  # nothing left to send to
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert raised.value.record["apim_request_id"] in ("e-1", "w-1")
    assert "temporarily blocked" in raised.value.support_request


async def test_the_limit_bounds_concurrency_at_the_server(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    server.play(Reply(200, {"content-type": "application/json"}, b"{}", delay=0.1))
    transport = tower_aoai.AsyncTransport(max_concurrency=2, sleep=async_sleep)
    async with httpx2.AsyncClient(transport=transport) as client:
        responses = await asyncio.gather(*(client.post(server.url + "/l", content=b"{}") for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert len(server.hits) == 5
    assert server.max_in_flight == 2
    assert async_sleep.waits == []  # queued for a permit, not slept
    assert in_flight(transport) == 0
    assert transport.stats()["backends"]["default"]["gauges"]["limit"] == 2


async def test_a_cancelled_call_releases_its_permit(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    server.play(Reply(200, body=b"late", delay=2.0), Reply(200, body=b"next"))
    transport = tower_aoai.AsyncTransport(max_concurrency=1, sleep=async_sleep)
    async with httpx2.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(client.get(server.url + "/slow"))
        assert await asyncio.to_thread(server.hit.wait, 5.0)
        assert in_flight(transport) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert in_flight(transport) == 0
        # The one permit is free again: the next call goes at once.
        response = await asyncio.wait_for(client.get(server.url + "/next"), 5.0)
    assert response.text == "next"


async def test_pacing_waits_with_the_injected_sleep(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    interval = 60 / (60 * 0.97)
    async with httpx2.AsyncClient(transport=tower_aoai.AsyncTransport(rpm=60, sleep=async_sleep)) as client:
        for _ in range(3):
            assert (await client.post(server.url + "/p", content=b"{}")).status_code == 200
    assert len(server.hits) == 3
    assert len(async_sleep.waits) == 2
    assert all(interval - 0.25 <= w <= interval + 1e-6 for w in async_sleep.waits), async_sleep.waits


async def test_a_success_after_failover_is_counted_per_backend(
    east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    east.play(throttle(retry_after_ms="60000"), chat_completion("from east"))
    transport = tower_aoai.AsyncTransport(backends=two(east, west), sleep=async_sleep)
    async with azure(transport) as client:
        assert [await chat(client) for _ in range(3)] == ["from west"] * 3
    stats = transport.stats()["backends"]
    assert (stats["east"]["requests"], stats["east"]["throttled"]["quota"]) == (1, 1)
    assert (stats["west"]["requests"], stats["west"]["successes"], stats["west"]["retries"]) == (3, 3, 1)
    assert stats["east"]["gauges"]["cooldown_until"] is not None
    assert stats["west"]["gauges"]["cooldown_until"] is None
