"""The httpx2 transports (openai >= 3)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import httpx2

from ._core import Engine
from ._driver import AsyncDriver, SyncDriver

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._driver import EngineSettings


class Transport(SyncDriver, httpx2.BaseTransport):
    """An ``httpx2`` transport that retries, fails over, limits and paces calls as the Rust core
    decides.

    Wraps ``transport`` (default ``httpx2.HTTPTransport()``). Settings are those of
    :class:`tower_aoai.Engine`: retry (``max_attempts``, ``deadline``, ``max_wait``,
    ``backoff_base``, ``backoff_cap``, ``hint_jitter``, ``budget_*``, ``seed``), ``backends`` (a list
    of :class:`tower_aoai.Backend`; ``None`` sends where the request points), the adaptive limit
    per backend (``initial_concurrency``, ``min_concurrency``, ``max_concurrency``,
    ``queue_timeout``) and pacing (``rpm``, ``tpm``); or pass a shared ``engine=``. ``sleep``
    (default ``time.sleep``) carries out waits; a fake sleep that returns at once advances the
    engine's clock by the wait (tests).

    When it gives up it returns the last response with ``x-should-retry: false``, so the openai
    SDK above it does not retry again; when no backend can serve it raises a
    :class:`tower_aoai.TowerAoaiError`. Success bodies are never read: streams pass through, and a
    success keeps its concurrency permit until its body is read to the end, closed or collected
    (a streaming call holds its slot while it streams).

    With several backends it hedges a slow attempt as :class:`AsyncTransport` does
    (``hedge_quantile``, ``hedge_min_samples``, ``hedge_budget``). A call that may hedge runs its
    attempts on threads of their own (in a copy of the caller's context); a losing attempt is
    cancelled in the engine at once, but its blocking request runs on until its answer comes,
    which is then closed unread. ``close()`` waits for such attempts (at most 10 s) before closing
    the inner transport.
    """

    _http: ClassVar[ModuleType] = httpx2

    def __init__(
        self,
        transport: httpx2.BaseTransport | None = None,
        *,
        engine: Engine | None = None,
        sleep: Callable[[float], None] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> None:
        self._setup(transport, engine, sleep, dict(settings))

    if TYPE_CHECKING:
        # At run time the driver's own method serves (no wrapper call per request); this only
        # gives it the httpx2 types.
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            """Sends ``request``, retrying as the engine decides; returns the final response."""
            response: httpx2.Response = super().handle_request(request)
            return response


class AsyncTransport(AsyncDriver, httpx2.AsyncBaseTransport):
    """The asynchronous :class:`Transport`, for ``httpx2.AsyncClient`` (``openai.AsyncAzureOpenAI``).

    Wraps ``transport`` (default ``httpx2.AsyncHTTPTransport()``); ``sleep`` (default
    ``asyncio.sleep``) carries out waits. With several backends it hedges a slow attempt
    (``hedge_quantile``, ``hedge_min_samples``, ``hedge_budget``): after the backends' latency
    quantile a second attempt goes to another usable backend, the first successful answer wins
    and the other attempt is cancelled (its connection closed, its permit given back).
    """

    _http: ClassVar[ModuleType] = httpx2

    def __init__(
        self,
        transport: httpx2.AsyncBaseTransport | None = None,
        *,
        engine: Engine | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> None:
        self._setup(transport, engine, sleep, dict(settings))

    if TYPE_CHECKING:
        # At run time the driver's own coroutine serves (no wrapper coroutine per request).
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            """Sends ``request``, retrying as the engine decides; returns the final response."""
            response: httpx2.Response = await super().handle_async_request(request)
            return response
