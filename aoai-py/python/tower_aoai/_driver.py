"""The call loop shared by every transport, written once for httpx2 and legacy httpx.

The classes here are mixins: a concrete transport sets ``_http`` to the httpx module it speaks
(``httpx2`` or ``httpx``) and inherits that module's ``BaseTransport``/``AsyncBaseTransport``.
Every decision comes from the Rust engine (``tower_aoai._core``): the loop asks ``call.next()``
and carries the answer out (send an attempt, rewritten through Rust for its backend; sleep; wait
for another attempt to end; raise), then feeds each attempt's outcome back. It reads only the
start of error bodies, never a success body.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from ._core import MAX_ERROR_BODY, Attempt, Call, Diagnosis, Engine, Failure
from ._errors import BlockedError, DeadlineExceededError, NoBackendError, OverloadedError, TowerAoaiError

if TYPE_CHECKING:
    from typing_extensions import TypedDict

    from ._core import Backend

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
        backends: list[Backend] | None
        initial_concurrency: int | None
        min_concurrency: int
        max_concurrency: int
        rpm: float | None
        tpm: float | None
        queue_timeout: float
        chars_per_token: float | None
        prompt_share: float | None
        default_completion_tokens: int | None


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


def _origin(request: Any) -> str:
    """``host[:port]`` of the request (what a passthrough engine's 403 record names)."""
    netloc: bytes = request.url.netloc
    return netloc.decode("ascii", "replace")


def _failure_error(failure: Failure) -> TowerAoaiError:
    kind = failure.kind
    if kind == "blocked":
        return BlockedError(failure.message, failure.record, failure.support_request)
    if kind == "overloaded":
        return OverloadedError(failure.message)
    if kind == "no_backend":
        return NoBackendError(failure.message)
    return DeadlineExceededError(failure.message)


#: Parsed backend URLs kept per transport (httpx's URL parser costs more than the whole Rust
#: decision); a handful of deployments x API versions x backends in practice.
_URL_CACHE_SIZE = 256


def _rewrite(http: ModuleType, urls: dict[str, Any], request: Any, attempt: Attempt) -> Any:
    """The request as the attempt's backend needs it (host, deployment, model, auth)."""
    url, headers, body = attempt.rewrite(str(request.url), request.headers.raw, request.content)
    target = urls.get(url)
    if target is None:
        if len(urls) >= _URL_CACHE_SIZE:
            urls.clear()
        target = urls[url] = http.URL(url)
    # The original stream is a replayable ByteStream (the request was read); headers carry the
    # rewritten host and, for a rewritten body, its length.
    return http.Request(
        request.method,
        target,
        headers=headers,
        stream=request.stream if body is None else http.ByteStream(body),
        extensions=request.extensions,
    )


def _log_attempt(
    request: Any, call: Call, attempt: Attempt, response: Any, after: tuple[str, str, str | None]
) -> None:
    action, outcome, reason = after
    if outcome == "blocked":
        logger.warning(
            "%s: backend %s (%s) is temporarily blocked (403); its resource is taken out of rotation. "
            "Support record:\n%s",
            _where(request),
            attempt.backend,
            attempt.region or "no region",
            attempt.support_request,
        )
    if action == "give_up":
        logger.info(
            "%s: giving up after %d attempts (%s, last outcome %s)",
            _where(request),
            call.attempts,
            reason,
            outcome,
        )
    if logger.isEnabledFor(logging.DEBUG):
        headers = response.headers if response is not None else {}
        logger.debug(
            "%s: attempt %d to backend %s (region %s, apim-request-id %s): status %s, %s -> %s",
            _where(request),
            call.attempts,
            attempt.backend,
            attempt.region or headers.get("x-ms-region") or "unknown",
            headers.get("apim-request-id") or "none",
            response.status_code if response is not None else "no response",
            outcome,
            action,
        )


def _log_wait(request: Any, kind: str, seconds: float) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: %s %.3f s before the next attempt", _where(request), kind, seconds)


class _Base:
    _http: ClassVar[ModuleType]
    _engine: Engine
    _inner: Any
    #: Attempts of this transport that ended (a queued call waits for this to move).
    _ends: int
    _urls: dict[str, Any]

    @property
    def engine(self) -> Engine:
        """The Rust engine (policy, budget, backends, limiter, pacing, stats) this transport defers to."""
        return self._engine

    def stats(self) -> dict[str, Any]:
        """Counters and gauges per backend and recent 403 records: see ``Engine.stats``."""
        return self._engine.stats()

    def diagnose(self) -> Diagnosis:
        """Why throttling happened (quota, capacity, region) and what to send support: see
        ``Engine.diagnose``."""
        return self._engine.diagnose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self._engine!r}, transport={type(self._inner).__name__})"


class SyncDriver(_Base):
    """The synchronous call loop (``handle_request``)."""

    _sleep: Callable[[float], None]
    _ended: threading.Condition
    #: Calls waiting on `_ended` now.
    _queued: int

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
        self._ended = threading.Condition()
        self._ends = 0
        self._queued = 0
        self._urls = {}

    def handle_request(self, request: Any) -> Any:
        """Sends ``request`` as the engine decides; returns the final response."""
        request.read()  # replayable from here on
        call = self._engine.start(request.content, _origin(request) if self._engine.passthrough else None)
        while True:
            seen = self._ends
            step, value = call.next()
            if step == "send":
                assert isinstance(value, Attempt)
                try:
                    response, error, after = self._attempt(request, call, value)
                finally:
                    value.cancel()  # a no-op once the attempt has its outcome
                    self._attempt_ended()
                _log_attempt(request, call, value, response, after)
                action = after[0]
                if action == "retry":
                    if response is not None:
                        response.close()
                    continue
                if action == "give_up" and response is not None:
                    response.headers["x-should-retry"] = "false"
                if error is not None:
                    raise error
                return response
            if step == "wait":
                assert isinstance(value, float)
                _log_wait(request, "waiting", value)
                self._sleep(value)
            elif step == "queue":
                assert isinstance(value, float)
                _log_wait(request, "queueing for a permit up to", value)
                with self._ended:
                    self._queued += 1
                    try:
                        if self._ends == seen:
                            self._ended.wait(value)
                    finally:
                        self._queued -= 1
            else:
                assert isinstance(value, Failure)
                logger.info("%s: %s", _where(request), value.message)
                raise _failure_error(value)

    def _attempt(self, request: Any, call: Call, attempt: Attempt) -> tuple[Any, BaseException | None, Any]:
        """Sends one attempt; returns (response or None, transport error or None, decision)."""
        sent = _rewrite(self._http, self._urls, request, attempt) if attempt.rewrites else request
        response = None
        try:
            response = self._inner.handle_request(sent)
            if call.needs_body(response.status_code):
                prefix = self._read_prefix(response, call)
                after = attempt.on_response(
                    response.status_code, response.headers.raw, _for_classification(prefix, response)
                )
            else:
                after = attempt.on_response(response.status_code, response.headers.raw)
            return response, None, after
        except self._http.TimeoutException as exc:
            if response is not None:
                response.close()  # the error body broke off: this response is not returned
            return None, exc, attempt.on_error("timeout")
        except self._http.TransportError as exc:
            if response is not None:
                response.close()
            return None, exc, attempt.on_error("connect")
        except BaseException:
            if response is not None:
                response.close()
            raise

    def _attempt_ended(self) -> None:
        self._ends += 1
        # A queued call counts itself before it compares `_ends`: either it sees the new count,
        # or this sees it and wakes it. No lock when nobody queues (the fast path).
        if self._queued:
            with self._ended:
                self._ended.notify_all()

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
    """The asynchronous call loop (``handle_async_request``)."""

    _sleep: Callable[[float], Awaitable[None]]
    _waiters: list[asyncio.Future[None]]

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
        self._waiters = []
        self._ends = 0
        self._urls = {}

    async def handle_async_request(self, request: Any) -> Any:
        """Sends ``request`` as the engine decides; returns the final response."""
        await request.aread()  # replayable from here on
        call = self._engine.start(request.content, _origin(request) if self._engine.passthrough else None)
        while True:
            seen = self._ends
            step, value = call.next()
            if step == "send":
                assert isinstance(value, Attempt)
                try:
                    response, error, after = await self._attempt(request, call, value)
                finally:
                    value.cancel()  # a no-op once the attempt has its outcome
                    self._attempt_ended()
                _log_attempt(request, call, value, response, after)
                action = after[0]
                if action == "retry":
                    if response is not None:
                        await response.aclose()
                    continue
                if action == "give_up" and response is not None:
                    response.headers["x-should-retry"] = "false"
                if error is not None:
                    raise error
                return response
            if step == "wait":
                assert isinstance(value, float)
                _log_wait(request, "waiting", value)
                await self._sleep(value)
            elif step == "queue":
                assert isinstance(value, float)
                _log_wait(request, "queueing for a permit up to", value)
                if self._ends == seen:
                    await self._queue(value)
            else:
                assert isinstance(value, Failure)
                logger.info("%s: %s", _where(request), value.message)
                raise _failure_error(value)

    async def _queue(self, timeout: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _attempt_ended(self) -> None:
        self._ends += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def _attempt(self, request: Any, call: Call, attempt: Attempt) -> tuple[Any, BaseException | None, Any]:
        """Sends one attempt; returns (response or None, transport error or None, decision)."""
        sent = _rewrite(self._http, self._urls, request, attempt) if attempt.rewrites else request
        response = None
        try:
            response = await self._inner.handle_async_request(sent)
            if call.needs_body(response.status_code):
                prefix = await self._read_prefix(response, call)
                after = attempt.on_response(
                    response.status_code, response.headers.raw, _for_classification(prefix, response)
                )
            else:
                after = attempt.on_response(response.status_code, response.headers.raw)
            return response, None, after
        except self._http.TimeoutException as exc:
            if response is not None:
                await response.aclose()
            return None, exc, attempt.on_error("timeout")
        except self._http.TransportError as exc:
            if response is not None:
                await response.aclose()
            return None, exc, attempt.on_error("connect")
        except BaseException:
            if response is not None:
                await response.aclose()
            raise

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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
