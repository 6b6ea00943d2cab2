"""tower_aoai.AsyncTransport hedging: a slow attempt gets a second one to another backend after
the latency quantile, the first successful answer wins, the loser is cancelled (its connection
dropped, its permit back), and hedges stay within their budget. The sync transport's hedging is in
test_hedging_sync.py."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx2
import openai
import pytest
from conftest import GATE_TIMEOUT, AsyncFakeSleep, ScriptedServer, server_error, slow, tiered
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

pytestmark = pytest.mark.anyio

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


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


async def warm_up(client: openai.AsyncAzureOpenAI, east: ScriptedServer, calls: int) -> None:
    """`calls` fast answers from east: the latency history hedging needs."""
    for _ in range(calls):
        assert await chat(client) == "from east"
    assert len(east.hits) == calls


async def test_a_slow_attempt_is_hedged_and_the_loser_cancelled(
    east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    transport = tower_aoai.AsyncTransport(
        backends=tiered(east, west), sleep=async_sleep, hedge_min_samples=5, hedge_budget=1.0
    )
    hold = threading.Event()
    try:
        async with azure(transport) as client:
            await warm_up(client, east, 5)
            east.play(slow("late from east", hold=hold))
            assert await chat(client) == "from west"
            # The primary's request was cancelled: the server sees its connection dropped.
            assert await asyncio.to_thread(east.dropped.wait, GATE_TIMEOUT)
            assert (len(east.hits), len(west.hits)) == (1, 1)
            stats = transport.stats()["backends"]
            assert stats["east"]["gauges"]["in_flight"] == 0
            assert stats["west"]["gauges"]["in_flight"] == 0
            assert (stats["west"]["hedges"], stats["west"]["hedge_wins"]) == (1, 1)
            assert west.hits[0].headers["api-key"] == "west-key"
            assert json.loads(west.hits[0].body)["messages"] == MESSAGES
    finally:
        hold.set()
    assert async_sleep.waits == []


async def test_hedges_stay_within_their_budget(
    east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    # 10 % of the calls in a 10 s window: after 9 calls, the 10th may be hedged, the 11th not.
    transport = tower_aoai.AsyncTransport(
        backends=tiered(east, west), sleep=async_sleep, hedge_min_samples=5, hedge_budget=0.1
    )
    async with azure(transport) as client:
        await warm_up(client, east, 9)
        east.play(slow("late from east", delay=0.3))
        assert await chat(client) == "from west"
        assert await chat(client) == "late from east"
    assert len(west.hits) == 1
    assert transport.stats()["backends"]["west"]["hedges"] == 1


async def test_a_failed_hedge_waits_for_the_primary(
    east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep
) -> None:
    transport = tower_aoai.AsyncTransport(
        backends=tiered(east, west), sleep=async_sleep, hedge_min_samples=5, hedge_budget=1.0
    )
    async with azure(transport) as client:
        await warm_up(client, east, 5)
        budget = transport.engine.budget_remaining()
        east.play(slow("late from east", delay=0.3))
        west.play(server_error())
        assert await chat(client) == "late from east"
        # The hedge's failure spent no retry: the primary was still running.
        assert transport.engine.budget_remaining() >= budget
    assert (len(east.hits), len(west.hits)) == (1, 1)
    stats = transport.stats()["backends"]
    assert (stats["west"]["hedges"], stats["west"]["hedge_wins"]) == (1, 0)
    assert stats["east"]["gauges"]["in_flight"] == stats["west"]["gauges"]["in_flight"] == 0


async def test_hedging_off_never_hedges(east: ScriptedServer, west: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    transport = tower_aoai.AsyncTransport(
        backends=tiered(east, west), sleep=async_sleep, hedge_min_samples=5, hedge_quantile=None
    )
    async with azure(transport) as client:
        await warm_up(client, east, 5)
        east.play(slow("late from east", delay=0.2))
        assert await chat(client) == "late from east"
    assert len(west.hits) == 0
