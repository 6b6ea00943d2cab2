"""tower_aoai.Transport hedging: a call that may hedge runs its attempts on threads; a slow attempt
gets a second one to another backend after the latency quantile, the first successful answer wins,
the loser is cancelled in the engine at once (its permit back) and its answer closed when it comes,
and hedges stay within their budget. A call that cannot hedge stays on the caller's thread."""

from __future__ import annotations

import contextvars
import json
import threading
from typing import Any

import httpx2
import openai
from conftest import FakeSleep, ScriptedServer, server_error, slow, tiered
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

#: What a test sets in the caller's context, to see it in the attempt's thread.
TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="none")


def azure(transport: tower_aoai.Transport) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint="https://sdk.example",
        api_key="sdk-key",
        api_version="2024-10-21",
        http_client=httpx2.Client(transport=transport),
    )


def chat(client: openai.AzureOpenAI) -> str | None:
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


def warm_up(client: openai.AzureOpenAI, east: ScriptedServer, calls: int) -> None:
    """`calls` fast answers from east: the latency history hedging needs."""
    for _ in range(calls):
        assert chat(client) == "from east"
    assert len(east.hits) == calls


def gauges(transport: tower_aoai.Transport, name: str) -> dict[str, Any]:
    gauge: dict[str, Any] = transport.stats()["backends"][name]["gauges"]
    return gauge


class Recording(httpx2.HTTPTransport):
    """The inner transport, noting the thread and the context each request was sent from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.seen.append((threading.current_thread().name, TRACE.get()))
        return super().handle_request(request)


def test_a_slow_attempt_is_hedged_and_the_loser_cancelled(
    east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep
) -> None:
    transport = tower_aoai.Transport(backends=tiered(east, west), sleep=sleep, hedge_min_samples=5, hedge_budget=1.0)
    hold = threading.Event()
    client = azure(transport)
    try:
        warm_up(client, east, 5)
        east.play(slow("late from east", hold=hold))
        assert chat(client) == "from west"
        # The primary is still at east, held; it was cancelled in the engine at once: its
        # permit is back and no loser holds a slot.
        assert east.in_flight == 1
        assert gauges(transport, "east")["in_flight"] == 0
        assert gauges(transport, "west")["in_flight"] == 0
        stats = transport.stats()["backends"]
        assert (stats["west"]["hedges"], stats["west"]["hedge_wins"]) == (1, 1)
        assert west.hits[0].headers["api-key"] == "west-key"
        assert json.loads(west.hits[0].body)["messages"] == MESSAGES
    finally:
        hold.set()
        # Closing waits for the loser: its late answer comes and is closed unread.
        client.close()
    assert not transport._losers
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert gauges(transport, "east")["in_flight"] == 0
    # The late answer counted for nothing: no success at east beyond the warm-up's.
    assert transport.stats()["backends"]["east"]["successes"] == 5
    assert sleep.waits == []


def test_hedges_stay_within_their_budget(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    # 10 % of the calls in a 10 s window: after 9 calls, the 10th may be hedged, the 11th not.
    transport = tower_aoai.Transport(backends=tiered(east, west), sleep=sleep, hedge_min_samples=5, hedge_budget=0.1)
    with azure(transport) as client:
        warm_up(client, east, 9)
        east.play(slow("late from east", delay=0.3))
        assert chat(client) == "from west"
        assert chat(client) == "late from east"
    assert len(west.hits) == 1
    assert transport.stats()["backends"]["west"]["hedges"] == 1


def test_a_failed_hedge_waits_for_the_primary(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    transport = tower_aoai.Transport(backends=tiered(east, west), sleep=sleep, hedge_min_samples=5, hedge_budget=1.0)
    with azure(transport) as client:
        warm_up(client, east, 5)
        budget = transport.engine.budget_remaining()
        east.play(slow("late from east", delay=0.3))
        west.play(server_error())
        assert chat(client) == "late from east"
        # The hedge's failure spent no retry: the primary was still running.
        assert transport.engine.budget_remaining() >= budget
    assert (len(east.hits), len(west.hits)) == (1, 1)
    stats = transport.stats()["backends"]
    assert (stats["west"]["hedges"], stats["west"]["hedge_wins"]) == (1, 0)
    assert stats["east"]["gauges"]["in_flight"] == stats["west"]["gauges"]["in_flight"] == 0


def test_hedging_off_never_hedges(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    transport = tower_aoai.Transport(backends=tiered(east, west), sleep=sleep, hedge_min_samples=5, hedge_quantile=None)
    with azure(transport) as client:
        warm_up(client, east, 5)
        east.play(slow("late from east", delay=0.2))
        assert chat(client) == "late from east"
    assert len(west.hits) == 0


def test_an_attempt_thread_runs_in_the_callers_context(
    east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep
) -> None:
    inner = Recording()
    transport = tower_aoai.Transport(
        inner, backends=tiered(east, west), sleep=sleep, hedge_min_samples=5, hedge_budget=1.0
    )
    caller = threading.current_thread().name
    with azure(transport) as client:
        token = TRACE.set("call-42")
        try:
            warm_up(client, east, 5)
            # Before the latency history, no call can hedge: each stays on the caller's thread.
            assert inner.seen == [(caller, "call-42")] * 5
            assert chat(client) == "from east"
        finally:
            TRACE.reset(token)
    # Once it may hedge, the call's attempt runs on a thread of its own, with the caller's context.
    thread, trace = inner.seen[-1]
    assert thread != caller and thread.startswith("tower_aoai-attempt")
    assert trace == "call-42"


def test_a_lone_backend_never_leaves_the_callers_thread(server: ScriptedServer, sleep: FakeSleep) -> None:
    inner = Recording()
    backend = tower_aoai.Backend("only", server.url, deployment="d", api_key="k")
    transport = tower_aoai.Transport(inner, backends=[backend], sleep=sleep, hedge_min_samples=1, hedge_budget=1.0)
    with azure(transport) as client:
        for _ in range(5):
            assert chat(client) == "hello"
    assert {thread for thread, _ in inner.seen} == {threading.current_thread().name}
