"""The same transports for the legacy ``httpx`` (openai < 3). Imported on first use only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without httpx installed
    raise ImportError(
        "tower_aoai.HttpxTransport and AsyncHttpxTransport need the legacy `httpx` package: "
        "pip install 'tower-aoai[legacy]'"
    ) from exc

from ._core import Engine
from ._driver import AsyncDriver, SyncDriver

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._driver import EngineSettings


class HttpxTransport(SyncDriver, httpx.BaseTransport):
    """:class:`tower_aoai.Transport` for the legacy ``httpx.Client`` (openai < 3)."""

    _http: ClassVar[ModuleType] = httpx

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        engine: Engine | None = None,
        sleep: Callable[[float], None] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> None:
        self._setup(transport, engine, sleep, dict(settings))

    if TYPE_CHECKING:
        # At run time the driver's own method serves (no wrapper call per request); this only
        # gives it the httpx types.
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            """Sends ``request``, retrying as the engine decides; returns the final response."""
            response: httpx.Response = super().handle_request(request)
            return response


class AsyncHttpxTransport(AsyncDriver, httpx.AsyncBaseTransport):
    """:class:`tower_aoai.AsyncTransport` for the legacy ``httpx.AsyncClient`` (openai < 3)."""

    _http: ClassVar[ModuleType] = httpx

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        engine: Engine | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> None:
        self._setup(transport, engine, sleep, dict(settings))

    if TYPE_CHECKING:
        # At run time the driver's own coroutine serves (no wrapper coroutine per request).
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            """Sends ``request``, retrying as the engine decides; returns the final response."""
            response: httpx.Response = await super().handle_async_request(request)
            return response
