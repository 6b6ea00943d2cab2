"""tower_aoai.Transport: a success keeps its concurrency permit until its body ends (a stream
holds its slot while it streams, as in the Rust limit layer), and the queue depth is exact."""

from __future__ import annotations

import gc
import threading

import httpx2
import openai
from conftest import GATE_TIMEOUT, FakeSleep, QueueLog, ScriptedServer, chat_completion, sse_stream, throttle
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def azure(server: ScriptedServer, transport: tower_aoai.Transport) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=server.url,
        api_key="sk-test",
        api_version="2024-10-21",
        http_client=httpx2.Client(transport=transport),
    )


def chat(client: openai.AzureOpenAI) -> str | None:
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


def gauges(transport: tower_aoai.Transport) -> tuple[int, int]:
    g = transport.stats()["backends"]["default"]["gauges"]
    return g["in_flight"], g["queue_depth"]


def test_a_stream_holds_the_only_permit_until_it_is_consumed(
    server: ScriptedServer, sleep: FakeSleep, queue_log: QueueLog
) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b", "c"], gate), chat_completion("second"))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    answers: list[str | None] = []
    with azure(server, transport) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.content == "a"
        second = threading.Thread(target=lambda: answers.append(chat(client)))
        second.start()
        assert queue_log.wait_for(1)
        # The stream's headers arrived long ago, but it still streams: the second call waits.
        assert len(server.hits) == 1
        assert gauges(transport) == (1, 1)
        gate.set()
        rest = [c.choices[0].delta.content for c in chunks if c.choices]
        second.join(GATE_TIMEOUT)
    assert rest == ["b", "c"]
    assert answers == ["second"]
    assert len(server.hits) == 2
    assert server.last_chunk_at is not None and server.hits[1].at > server.last_chunk_at
    assert server.max_open == 1
    # The non-streaming call read its body and closed it: its permit is back too.
    assert gauges(transport) == (0, 0)
    assert sleep.waits == []


def test_closing_a_stream_early_gives_its_permit_back(
    server: ScriptedServer, sleep: FakeSleep, queue_log: QueueLog
) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b", "c"], gate), chat_completion("next"))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    with azure(server, transport) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        assert next(iter(stream)).choices[0].delta.content == "a"
        assert gauges(transport) == (1, 0)
        stream.close()
        assert gauges(transport) == (0, 0)
        gate.set()
        assert chat(client) == "next"
    assert queue_log.count == 0  # the next call found the permit free
    assert gauges(transport) == (0, 0)


def test_an_abandoned_response_gives_its_permit_back_when_collected(server: ScriptedServer, sleep: FakeSleep) -> None:
    gate = threading.Event()
    server.play(sse_stream(["a", "b"], gate))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    with httpx2.Client(transport=transport) as client:
        response = client.send(client.build_request("POST", server.url + "/s", content=b"{}"), stream=True)
        assert response.status_code == 200
        assert gauges(transport) == (1, 0)
        del response
        gc.collect()
        assert gauges(transport) == (0, 0)
        gate.set()


def test_a_stream_read_to_its_end_counts_one_success(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(sse_stream(["a", "b"]))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    with httpx2.Client(transport=transport) as client:
        with client.stream("POST", server.url + "/s", content=b"{}") as response:
            assert gauges(transport) == (1, 0)
            body = b"".join(response.iter_bytes())
            assert gauges(transport) == (0, 0)
        # Closing after the end changes nothing.
        assert gauges(transport) == (0, 0)
    assert body.endswith(b"data: [DONE]\n\n")
    stats = transport.stats()["backends"]["default"]
    assert (stats["requests"], stats["successes"]) == (1, 1)


def test_a_throttled_call_returns_its_permit_at_the_headers(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(throttle(retry_after_ms="10"), chat_completion("after"))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    with azure(server, transport) as client:
        assert chat(client) == "after"
    assert len(server.hits) == 2
    assert gauges(transport) == (0, 0)


def test_a_lease_ends_once() -> None:
    engine = tower_aoai.Engine(max_concurrency=1)
    call = engine.start(b"{}")
    step, attempt = call.next()
    assert step == "send" and isinstance(attempt, tower_aoai.Attempt)
    (action, outcome, _), lease = attempt.on_response_streamed(200, [])
    assert (action, outcome) == ("return", "success")
    assert lease is not None and lease.open and lease.backend == "default"
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 1
    # The only permit is taken: another call queues, and counts in the queue depth.
    other = engine.start(b"{}")
    assert other.next()[0] == "queue"
    assert engine.stats()["backends"]["default"]["gauges"]["queue_depth"] == 1
    assert lease.finish() is True
    assert (lease.finish(), lease.fail(), lease.cancel(), lease.open) == (False, False, False, False)
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 0
    step, second = other.next()
    assert step == "send" and isinstance(second, tower_aoai.Attempt)
    assert engine.stats()["backends"]["default"]["gauges"]["queue_depth"] == 0
    # A dropped lease gives its permit back; a failure never has one.
    (_, _, _), lease = second.on_response_streamed(200, [])
    assert lease is not None
    del lease
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 0
    step, third = engine.start(b"{}").next()
    assert isinstance(third, tower_aoai.Attempt)
    (action, outcome, _), lease = third.on_response_streamed(500, [], b"{}")
    assert (action, outcome, lease) == ("retry", "transient_5xx", None)


def test_a_call_dropped_while_queued_leaves_the_queue() -> None:
    engine = tower_aoai.Engine(max_concurrency=1)
    step, held = engine.start(b"{}").next()
    assert step == "send"
    queued = [engine.start(b"{}") for _ in range(3)]
    assert [c.next()[0] for c in queued] == ["queue"] * 3

    def depth() -> int:
        value = engine.stats()["backends"]["default"]["gauges"]["queue_depth"]
        assert isinstance(value, int)
        return value

    assert depth() == 3
    queued[0].forget()
    queued[0].forget()
    assert depth() == 2
    del queued[1]
    assert depth() == 1
    assert isinstance(held, tower_aoai.Attempt)
    held.cancel()
    assert queued[-1].next()[0] == "send"
    assert depth() == 0
