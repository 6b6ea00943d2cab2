"""The retry loop shared by every transport, written once for httpx2 and legacy httpx.

The classes here are mixins: a concrete transport sets ``_http`` to the httpx module it speaks
(``httpx2`` or ``httpx``) and inherits that module's ``BaseTransport``/``AsyncBaseTransport``.
Every decision comes from the Rust engine (``tower_aoai._core``); this code only sends, reads the
start of error bodies, sleeps and returns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from ._core import MAX_ERROR_BODY, Call, Engine

if TYPE_CHECKING:
    from typing_extensions import TypedDict

    class EngineSettings(TypedDict, total=False):
        """Keyword settings of :class:`tower_aoai.Engine`."""

        max_attempts: int
        deadline: float | None
        max_wait: float
        backoff_base: float
        backoff_cap: float
        hint_jitter: float
        budget_ttl: float
        budget_min_per_sec: int
        budget_ratio: float
        seed: int | None


logger = logging.getLogger("tower_aoai")

#: The longest the start of an error body is read before classifying on what arrived (the Rust
#: layer uses the same bound), so a server that trickles an error body cannot stall a call.
ERROR_BODY_TIMEOUT = 10.0


def _engine(engine: Engine | None, settings: dict[str, Any]) -> Engine:
    if engine is None:
        return Engine(**settings)
    if settings:
        raise TypeError(f"pass either `engine` or settings ({', '.join(sorted(settings))}), not both")
    if not isinstance(engine, Engine):
        raise TypeError(f"`engine` must be a tower_aoai.Engine, got {type(engine).__name__}")
    return engine


@functools.cache
def _prefixed_stream_class(http: ModuleType) -> type:
    """A response stream (sync and async) for ``http`` that yields an already-read prefix and
    then the rest of the original stream; closing it closes the original."""

    class PrefixedStream(http.SyncByteStream, http.AsyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, prefix: bytes, rest: Any, original: Any) -> None:
            self._prefix = prefix
            self._rest = rest
            self._original = original

        def __iter__(self) -> Iterator[bytes]:
            if self._prefix:
                yield self._prefix
            if self._rest is not None:
                yield from self._rest

        async def __aiter__(self) -> AsyncIterator[bytes]:
            if self._prefix:
                yield self._prefix
            if self._rest is not None:
                async for chunk in self._rest:
                    yield chunk

        def close(self) -> None:
            # Finish the half-read iterator first, so nothing is left for the garbage collector.
            rest, self._rest = self._rest, None
            if rest is not None and hasattr(rest, "close"):
                rest.close()
            self._original.close()

        async def aclose(self) -> None:
            rest, self._rest = self._rest, None
            if rest is not None and hasattr(rest, "aclose"):
                await rest.aclose()
            await self._original.aclose()

    return PrefixedStream


def _for_classification(prefix: bytes, response: Any) -> bytes:
    """The body start as the classifier should see it: a gzip/deflate body is inflated (at most
    MAX_ERROR_BODY bytes); anything undecodable is passed on as it came."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        for wbits in (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS):
            try:
                return zlib.decompressobj(wbits).decompress(prefix, MAX_ERROR_BODY)
            except zlib.error:
                continue
    return prefix[:MAX_ERROR_BODY]


def _read_limit(call: Call) -> float:
    remaining = call.remaining()
    return ERROR_BODY_TIMEOUT if remaining is None else min(ERROR_BODY_TIMEOUT, remaining)


def _where(request: Any) -> str:
    # Host and path only: a query string may carry a credential.
    return f"{request.method} {request.url.host}{request.url.path}"


def _log_retry(request: Any, call: Call, delay: float, reason: str | None) -> None:
    logger.debug(
        "%s: attempt %d %s; retrying in %.3f s",
        _where(request),
        call.attempts,
        reason,
        delay,
    )


def _log_give_up(request: Any, call: Call, reason: str | None) -> None:
    logger.info(
        "%s: giving up after %d attempts (%s, last outcome %s)",
        _where(request),
        call.attempts,
        reason,
        call.last_outcome,
    )


class _Base:
    _http: ClassVar[ModuleType]
    _engine: Engine
    _inner: Any

    @property
    def engine(self) -> Engine:
        """The Rust engine (policy, retry budget, jitter source) this transport defers to."""
        return self._engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self._engine!r}, transport={type(self._inner).__name__})"


class SyncDriver(_Base):
    """The synchronous retry loop (``handle_request``)."""

    _sleep: Callable[[float], None]

    def _setup(
        self,
        transport: Any,
        engine: Engine | None,
        sleep: Callable[[float], None] | None,
        settings: dict[str, Any],
    ) -> None:
        self._engine = _engine(engine, settings)
        self._inner = transport if transport is not None else self._http.HTTPTransport()
        self._sleep = time.sleep if sleep is None else sleep

    def handle_request(self, request: Any) -> Any:
        """Sends ``request``, retrying as the engine decides; returns the final response."""
        request.read()  # replayable from here on
        call = self._engine.start()
        while True:
            response = None
            error: BaseException | None = None
            try:
                response = self._inner.handle_request(request)
                if call.needs_body(response.status_code):
                    prefix = self._read_prefix(response, call)
                    action = call.on_response(
                        response.status_code, response.headers.raw, _for_classification(prefix, response)
                    )
                else:
                    action = call.on_response(response.status_code, response.headers.raw)
            except self._http.TimeoutException as exc:
                error = exc
                action = call.on_error("timeout")
            except self._http.TransportError as exc:
                error = exc
                action = call.on_error("connect")
            except BaseException:
                if response is not None:
                    response.close()
                raise
            if error is not None and response is not None:
                response.close()  # the error body broke off: this response is not returned
                response = None
            kind, delay, reason = action
            if kind == "retry":
                assert delay is not None
                _log_retry(request, call, delay, reason)
                if response is not None:
                    response.close()
                self._sleep(delay)
                continue
            if kind == "give_up":
                _log_give_up(request, call, reason)
                if response is not None:
                    response.headers["x-should-retry"] = "false"
            if error is not None:
                raise error
            return response

    def _read_prefix(self, response: Any, call: Call) -> bytes:
        original = response.stream
        rest = iter(original)
        chunks: list[bytes] = []
        size = 0
        done = False
        limit = _read_limit(call)
        started = time.monotonic()
        while size < MAX_ERROR_BODY:
            try:
                chunk = next(rest)
            except StopIteration:
                done = True
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() - started > limit:
                logger.warning("error body still arriving after %.1f s; classifying on what arrived", limit)
                break
        prefix = b"".join(chunks)
        response.stream = _prefixed_stream_class(self._http)(prefix, None if done else rest, original)
        return prefix

    def close(self) -> None:
        """Closes the inner transport."""
        self._inner.close()


class AsyncDriver(_Base):
    """The asynchronous retry loop (``handle_async_request``)."""

    _sleep: Callable[[float], Awaitable[None]]

    def _setup(
        self,
        transport: Any,
        engine: Engine | None,
        sleep: Callable[[float], Awaitable[None]] | None,
        settings: dict[str, Any],
    ) -> None:
        self._engine = _engine(engine, settings)
        self._inner = transport if transport is not None else self._http.AsyncHTTPTransport()
        self._sleep = asyncio.sleep if sleep is None else sleep

    async def handle_async_request(self, request: Any) -> Any:
        """Sends ``request``, retrying as the engine decides; returns the final response."""
        await request.aread()  # replayable from here on
        call = self._engine.start()
        while True:
            response = None
            error: BaseException | None = None
            try:
                response = await self._inner.handle_async_request(request)
                if call.needs_body(response.status_code):
                    prefix = await self._read_prefix(response, call)
                    action = call.on_response(
                        response.status_code, response.headers.raw, _for_classification(prefix, response)
                    )
                else:
                    action = call.on_response(response.status_code, response.headers.raw)
            except self._http.TimeoutException as exc:
                error = exc
                action = call.on_error("timeout")
            except self._http.TransportError as exc:
                error = exc
                action = call.on_error("connect")
            except BaseException:
                if response is not None:
                    await response.aclose()
                raise
            if error is not None and response is not None:
                await response.aclose()
                response = None
            kind, delay, reason = action
            if kind == "retry":
                assert delay is not None
                _log_retry(request, call, delay, reason)
                if response is not None:
                    await response.aclose()
                await self._sleep(delay)
                continue
            if kind == "give_up":
                _log_give_up(request, call, reason)
                if response is not None:
                    response.headers["x-should-retry"] = "false"
            if error is not None:
                raise error
            return response

    async def _read_prefix(self, response: Any, call: Call) -> bytes:
        original = response.stream
        rest = original.__aiter__()
        chunks: list[bytes] = []
        size = 0
        done = False
        limit = _read_limit(call)
        started = time.monotonic()
        while size < MAX_ERROR_BODY:
            try:
                chunk = await rest.__anext__()
            except StopAsyncIteration:
                done = True
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() - started > limit:
                logger.warning("error body still arriving after %.1f s; classifying on what arrived", limit)
                break
        prefix = b"".join(chunks)
        response.stream = _prefixed_stream_class(self._http)(prefix, None if done else rest, original)
        return prefix

    async def aclose(self) -> None:
        """Closes the inner transport."""
        await self._inner.aclose()
