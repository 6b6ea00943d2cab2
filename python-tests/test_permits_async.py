"""tower_aoai.AsyncTransport: a success keeps its concurrency permit until its body ends (a stream
holds its slot while it streams, as in the Rust limit layer), and the queue depth is exact."""

from __future__ import annotations

import asyncio
import threading

import httpx2
import openai
import pytest
from conftest import GATE_TIMEOUT, AsyncFakeSleep, QueueLog, ScriptedServer, chat_completion, sse_stream
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

pytestmark = pytest.mark.anyio

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def azure(server: ScriptedServer, transport: tower_aoai.AsyncTransport) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=server.url,
        api_key="sk-test",
        api_version="2024-10-21",
        http_client=httpx2.AsyncClient(transport=transport),
    )


async def chat(client: openai.AsyncAzureOpenAI) -> str | None:
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


def gauges(transport: tower_aoai.AsyncTransport) -> tuple[int, int]:
    g = transport.stats()["backends"]["default"]["gauges"]
    return g["in_flight"], g["queue_depth"]


async def test_a_stream_holds_the_only_permit_until_it_is_consumed(
    server: ScriptedServer, async_sleep: AsyncFakeSleep, queue_log: QueueLog
) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b", "c"], gate), chat_completion("queued"))
    transport = tower_aoai.AsyncTransport(max_concurrency=1, sleep=async_sleep)
    async with azure(server, transport) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = stream.__aiter__()
        assert (await chunks.__anext__()).choices[0].delta.content == "a"
        waiting = [asyncio.create_task(chat(client)) for _ in range(3)]
        assert await asyncio.to_thread(queue_log.wait_for, 3)
        assert len(server.hits) == 1
        assert gauges(transport) == (1, 3)
        # A call cancelled while it queues leaves the queue at once.
        waiting[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
        assert gauges(transport) == (1, 2)
        gate.set()
        rest = [c.choices[0].delta.content async for c in chunks if c.choices]
        answers = await asyncio.wait_for(asyncio.gather(*waiting[1:]), GATE_TIMEOUT)
    assert rest == ["b", "c"]
    assert answers == ["queued", "queued"]
    assert len(server.hits) == 3
    assert server.last_chunk_at is not None and server.hits[1].at > server.last_chunk_at
    assert server.max_open == 1
    assert gauges(transport) == (0, 0)
    assert async_sleep.waits == []


async def test_closing_a_stream_early_gives_its_permit_back(
    server: ScriptedServer, async_sleep: AsyncFakeSleep, queue_log: QueueLog
) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b", "c"], gate), chat_completion("next"))
    transport = tower_aoai.AsyncTransport(max_concurrency=1, sleep=async_sleep)
    async with azure(server, transport) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        assert (await stream.__aiter__().__anext__()).choices[0].delta.content == "a"
        assert gauges(transport) == (1, 0)
        await stream.close()
        assert gauges(transport) == (0, 0)
        gate.set()
        assert await chat(client) == "next"
    assert queue_log.count == 0  # the next call found the permit free
    assert gauges(transport) == (0, 0)


async def test_a_cancelled_stream_reader_gives_its_permit_back(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b"], gate))
    transport = tower_aoai.AsyncTransport(max_concurrency=1, sleep=async_sleep)
    first_chunk = asyncio.Event()

    async def read(client: httpx2.AsyncClient) -> None:
        async with client.stream("POST", server.url + "/s", content=b"{}") as response:
            async for _ in response.aiter_raw():
                first_chunk.set()

    async with httpx2.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(read(client))
        await asyncio.wait_for(first_chunk.wait(), GATE_TIMEOUT)
        assert gauges(transport) == (1, 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gauges(transport) == (0, 0)
        gate.set()
    stats = transport.stats()["backends"]["default"]
    assert (stats["requests"], stats["successes"]) == (1, 1)
