"""Both transports' queues: a returned permit wakes the first queued call alone, not every queued
call (which made a burst of N queued calls cost O(N^2) looks at the engine), and a woken call
that cannot use the permit passes the wake on, so no queued call waits for the engine's recheck."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest
from conftest import AsyncFakeSleep, FakeSleep, ScriptedServer, blocked, chat_completion

import tower_aoai

pytestmark = pytest.mark.anyio

URL = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = b'{"messages":[{"role":"user","content":"hi"}]}'
#: One permit, a queue wait far longer than any test.
ONE_PERMIT: dict[str, Any] = {"initial_concurrency": 1, "min_concurrency": 1, "max_concurrency": 1, "queue_timeout": 60.0}


def count_queue_waits(transport: Any) -> list[bool]:
    """Records what each of the transport's queue waits came to (woken, or the recheck's timeout)."""
    results: list[bool] = []
    wait: Callable[..., Any] = transport._queue
    if asyncio.iscoroutinefunction(wait):

        async def counted_async(*args: Any, **kwargs: Any) -> Any:
            woken = await wait(*args, **kwargs)
            results.append(woken)
            return woken

        transport._queue = counted_async
    else:

        def counted(*args: Any, **kwargs: Any) -> Any:
            woken = wait(*args, **kwargs)
            results.append(woken)
            return woken

        transport._queue = counted
    return results


async def test_async_a_returned_permit_wakes_one_queued_call(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    transport = tower_aoai.AsyncTransport(sleep=async_sleep, **ONE_PERMIT)
    waits = count_queue_waits(transport)
    calls = 30
    async with httpx2.AsyncClient(transport=transport, base_url=server.url) as client:

        async def one() -> int:
            response = await client.post(URL, content=BODY)
            await response.aread()
            return response.status_code

        assert await asyncio.gather(*(one() for _ in range(calls))) == [200] * calls
    # 29 calls queue once each, plus a look per returned permit or attempt end; waking every
    # queued call on every return would be ~29 + 28 + ... = 435.
    assert len(waits) <= 4 * calls, len(waits)
    assert transport.stats()["backends"]["default"]["gauges"]["queue_depth"] == 0


def test_sync_a_returned_permit_wakes_one_queued_call(server: ScriptedServer, sleep: FakeSleep) -> None:
    transport = tower_aoai.Transport(sleep=sleep, **ONE_PERMIT)
    waits = count_queue_waits(transport)
    calls = 20
    with httpx2.Client(transport=transport, base_url=server.url) as client:

        def one(_: int) -> int:
            response = client.post(URL, content=BODY)
            response.read()
            return response.status_code

        with ThreadPoolExecutor(calls) as pool:
            assert list(pool.map(one, range(calls))) == [200] * calls
    assert len(waits) <= 4 * calls, len(waits)
    assert transport.stats()["backends"]["default"]["gauges"]["queue_depth"] == 0


async def test_async_a_woken_call_that_fails_passes_the_wake_on(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    # The only call with the permit gets a 403: the resource is blocked. The first queued call
    # is woken and fails (blocked) without sending; it passes the wake on, so every queued call
    # ends woken, none at the engine's recheck.
    server.play(blocked())
    backend = tower_aoai.Backend("only", server.url, deployment="gpt-4o", api_key="k")
    transport = tower_aoai.AsyncTransport(backends=[backend], sleep=async_sleep, **ONE_PERMIT)
    waits = count_queue_waits(transport)
    async with httpx2.AsyncClient(transport=transport, base_url=server.url) as client:
        results = await asyncio.gather(*(client.post(URL, content=BODY) for _ in range(5)), return_exceptions=True)
    # The call that was answered gets the 403 itself; the queued ones the typed error.
    assert sorted(type(r).__name__ for r in results) == ["BlockedError"] * 4 + ["Response"], results
    assert len(server.hits) == 1
    assert waits and all(waits), waits


def test_sync_a_woken_call_that_fails_passes_the_wake_on(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(blocked())
    backend = tower_aoai.Backend("only", server.url, deployment="gpt-4o", api_key="k")
    transport = tower_aoai.Transport(backends=[backend], sleep=sleep, **ONE_PERMIT)
    waits = count_queue_waits(transport)
    started = threading.Barrier(5)
    with httpx2.Client(transport=transport, base_url=server.url) as client:

        def one(_: int) -> object:
            started.wait()
            try:
                return client.post(URL, content=BODY)
            except tower_aoai.BlockedError as error:
                return error

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(one, range(5)))
    # The call that was answered gets the 403 itself; the queued ones the typed error.
    assert sorted(type(r).__name__ for r in results) == ["BlockedError"] * 4 + ["Response"], results
    assert len(server.hits) == 1
    assert all(waits), waits


def test_chat_completion_is_the_default_reply(server: ScriptedServer) -> None:
    # The fixture's reply these tests rely on.
    assert server.script == [chat_completion()]


def test_sync_a_body_the_inner_transport_already_read_holds_no_permit() -> None:
    # A mock or caching inner transport hands back a read body: it has ended, so the success
    # gives its permit back at once (it was held until the response was garbage-collected).
    inner = httpx2.MockTransport(lambda request: httpx2.Response(200, json={"ok": 1}))
    transport = tower_aoai.Transport(inner, **{**ONE_PERMIT, "queue_timeout": 1.0})
    with httpx2.Client(transport=transport, base_url="http://aoai.example") as client:
        # One permit: a call that had to wait for it would be overloaded after 1 s.
        kept = [client.post(URL, content=BODY) for _ in range(3)]
        assert transport.stats()["backends"]["default"]["gauges"]["in_flight"] == 0
    assert [r.json() for r in kept] == [{"ok": 1}] * 3


async def test_async_a_body_the_inner_transport_already_read_holds_no_permit() -> None:
    inner = httpx2.MockTransport(lambda request: httpx2.Response(200, json={"ok": 1}))
    transport = tower_aoai.AsyncTransport(inner, **{**ONE_PERMIT, "queue_timeout": 1.0})
    async with httpx2.AsyncClient(transport=transport, base_url="http://aoai.example") as client:
        kept = [await client.post(URL, content=BODY) for _ in range(3)]
        assert transport.stats()["backends"]["default"]["gauges"]["in_flight"] == 0
    assert [r.json() for r in kept] == [{"ok": 1}] * 3


async def test_async_a_cancel_in_the_same_turn_as_the_wake_is_not_lost(server: ScriptedServer, async_sleep: AsyncFakeSleep) -> None:
    # A queued call is woken (its permit came back) and cancelled before it resumes. The cancel
    # wins: the call sends nothing and ends cancelled, and its wake passes to the next in line.
    # (Through `asyncio.wait_for` before Python 3.12 the cancel was lost: the call went on and
    # sent its request.)
    transport = tower_aoai.AsyncTransport(sleep=async_sleep, **ONE_PERMIT)
    waits = count_queue_waits(transport)
    async with httpx2.AsyncClient(transport=transport, base_url=server.url) as client:
        # The first call keeps the only permit while its body is unread.
        first = await client.send(client.build_request("POST", URL, content=BODY), stream=True)
        cancelled = asyncio.ensure_future(client.post(URL, content=BODY))
        following = asyncio.ensure_future(client.post(URL, content=BODY))
        for _ in range(1000):  # a bounded number of loop turns, no sleeping
            if len(transport._waiters) == 2:
                break
            await asyncio.sleep(0)
        assert len(transport._waiters) == 2
        # The cancel is scheduled as the wake resolves the first waiter: it lands after the wake,
        # before the woken call resumes.
        first_in_line, wake = transport._waiters[0], transport._wake

        def wake_then_cancel(waiter: asyncio.Future[bool]) -> None:
            if waiter is first_in_line:
                asyncio.get_running_loop().call_soon(cancelled.cancel)
            wake(waiter)

        transport._wake = wake_then_cancel  # type: ignore[method-assign]
        await first.aclose()  # the permit goes back and wakes the first in line
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # The wake went on to the next in line, which is served without waiting for the recheck.
        response = await asyncio.wait_for(following, 5.0)
        assert response.status_code == 200
        # The following call's one wait ended woken (the cancelled call's raised).
        assert waits == [True], waits
    assert len(server.hits) == 2  # the first call and the following one; the cancelled sent nothing
    gauges = transport.stats()["backends"]["default"]["gauges"]
    assert (gauges["in_flight"], gauges["queue_depth"]) == (0, 0)


class _OpenBody(httpx2.AsyncByteStream):
    """A success's body that stays unread (and so holds the call's permit) until it is closed."""

    async def __aiter__(self) -> Any:
        yield b"{}"

    async def aclose(self) -> None:
        pass


def _unread_bodies() -> Any:
    """An inner transport answering every request at once with a 200 whose body is still open:
    no I/O, so a call that does not wait for its permit ends within a few loop turns."""
    return httpx2.MockTransport(lambda request: httpx2.Response(200, stream=_OpenBody()))


async def _turns_until_done(task: asyncio.Future[Any], turns: int = 200) -> bool:
    """Whether `task` ends within a bounded number of loop turns (no sleeping)."""
    for _ in range(turns):
        if task.done():
            return True
        await asyncio.sleep(0)
    return task.done()


async def test_async_an_attempt_ending_as_a_call_joins_the_line_is_not_lost() -> None:
    # The call holding the only permit releases it (its body closed on another thread, or
    # collected) after the next call saw it held and before that call stood in line. The release
    # found nobody to wake; the queued call must notice rather than wait for the engine's recheck
    # (1 s) with the permit free.
    transport = tower_aoai.AsyncTransport(_unread_bodies(), **ONE_PERMIT)
    waits = count_queue_waits(transport)
    first = await transport.handle_async_request(httpx2.Request("POST", "http://aoai.example" + URL, content=BODY))
    leased: Any = first.stream  # the transport's LeasedStream, which holds the permit
    released = threading.Thread(target=leased.close)

    class ReleasedAsItJoins(deque[Any]):
        def append(self, waiter: Any) -> None:
            if released.ident is None:
                released.start()
                released.join()
            super().append(waiter)

    transport._waiters = ReleasedAsItJoins()
    second = asyncio.ensure_future(
        transport.handle_async_request(httpx2.Request("POST", "http://aoai.example" + URL, content=BODY))
    )
    try:
        assert await _turns_until_done(second), "the queued call waits for the recheck with the permit free"
        assert (await second).status_code == 200
    finally:
        second.cancel()
    assert released.ident is not None, "the call queued"
    assert waits == [False], waits
    await (await second).aclose()
    gauges = transport.stats()["backends"]["default"]["gauges"]
    assert (gauges["in_flight"], gauges["queue_depth"]) == (0, 0)
    assert not transport._waiters


async def test_async_a_wake_skips_a_waiter_whose_loop_was_closed() -> None:
    # A call queued on another event loop that was closed with the call still in line (a
    # transport shared across loops): a returned permit wakes the next live call instead of
    # failing the call that returned it with "Event loop is closed".
    transport = tower_aoai.AsyncTransport(_unread_bodies(), **ONE_PERMIT)
    waits = count_queue_waits(transport)
    first = await transport.handle_async_request(httpx2.Request("POST", "http://aoai.example" + URL, content=BODY))
    dead = asyncio.new_event_loop()
    stale = dead.create_future()
    dead.close()
    transport._waiters.append(stale)
    second = asyncio.ensure_future(
        transport.handle_async_request(httpx2.Request("POST", "http://aoai.example" + URL, content=BODY))
    )
    for _ in range(200):
        if len(transport._waiters) == 2:
            break
        await asyncio.sleep(0)
    assert len(transport._waiters) == 2
    await first.aclose()  # raised RuntimeError("Event loop is closed") before
    try:
        assert await _turns_until_done(second), "the live call was not woken"
    finally:
        second.cancel()
    assert waits == [True], waits
    await (await second).aclose()
    assert not transport._waiters


async def test_async_a_wake_racing_another_for_the_last_waiter_returns_quietly() -> None:
    # Two attempts end at once on two threads and both look for a call to wake: the one whose
    # pop comes after the other took the last waiter wakes nobody, and raises nothing (it raised
    # IndexError, pop from an empty deque, into the call whose attempt ended).
    transport = tower_aoai.AsyncTransport(_unread_bodies(), **ONE_PERMIT)
    waiter = asyncio.get_running_loop().create_future()
    taken: list[Any] = []

    class TakenInBetween(deque[Any]):
        def popleft(self) -> Any:
            if not taken:
                taken.append(super().popleft())  # the other thread's `_wake_one`, just before
            return super().popleft()

    transport._waiters = TakenInBetween([waiter])
    transport._attempt_ended()
    assert taken == [waiter]
    assert not transport._waiters
