"""The call loop shared by every transport, written once for httpx2 and legacy httpx.

The classes here are mixins: a concrete transport sets ``_http`` to the httpx module it speaks
(``httpx2`` or ``httpx``) and inherits that module's ``BaseTransport``/``AsyncBaseTransport``.
Every decision comes from the Rust engine (``tower_aoai._core``): the loop asks ``call.next()``
and carries the answer out (send an attempt, rewritten through Rust for its backend; sleep; wait
for another attempt to end; raise), then feeds each attempt's outcome back. It reads only the
start of error bodies, never a success body.

A success's body is handed up wrapped so that it keeps the attempt's concurrency permit (a
``Lease``) until it is read to its end, breaks off, is closed or is garbage-collected, as the Rust
limit layer's body does: a streaming call holds its slot while it streams. Both loops also
hedge a slow attempt with a second one to another backend when the engine says so (the sync loop
runs a call that may hedge on threads of its own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from ._core import MAX_ERROR_BODY, REWRITE_REMOVES, Attempt, Call, Diagnosis, Engine, Failure, Lease
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
        hedge_quantile: float | None
        hedge_min_samples: int
        hedge_budget: float
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


@functools.cache
def _leased_stream_class(http: ModuleType) -> type:
    """A success's response stream (sync and async) for ``http`` that holds the attempt's
    :class:`Lease` until the body ends: read to its end (``finish``), broken off by a transport
    error (``fail``), or closed, abandoned or garbage-collected first (``cancel``). The first end
    counts; it then calls ``ended`` (which wakes the first call queued for a permit)."""

    class LeasedStream(http.SyncByteStream, http.AsyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, stream: Any, lease: Lease, ended: Callable[[], None]) -> None:
            self._stream = stream
            self._lease: Lease | None = lease
            self._ended = ended

        def _end(self, how: str) -> None:
            lease, self._lease = self._lease, None
            if lease is not None and getattr(lease, how)():
                self._ended()

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self._stream:
                    yield chunk
            except http.TransportError:
                self._end("fail")
                raise
            except BaseException:  # closed early (GeneratorExit), interrupted
                self._end("cancel")
                raise
            self._end("finish")

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._stream:
                    yield chunk
            except http.TransportError:
                self._end("fail")
                raise
            except BaseException:  # closed early (GeneratorExit), cancelled
                self._end("cancel")
                raise
            self._end("finish")

        def close(self) -> None:
            try:
                if hasattr(self._stream, "close"):
                    self._stream.close()
            finally:
                self._end("cancel")  # a no-op once the body ended

        async def aclose(self) -> None:
            try:
                if hasattr(self._stream, "aclose"):
                    await self._stream.aclose()
            finally:
                self._end("cancel")

        def __del__(self) -> None:
            # A response nobody read to the end nor closed: its permit goes back when it is
            # collected (the Lease's own drop would too, without waking the queued calls).
            try:
                self._end("cancel")
            except Exception:  # the event loop may be gone at interpreter exit
                pass

    return LeasedStream


@functools.cache
def _header_triples(http: ModuleType) -> bool:
    """Whether ``http.Headers`` keeps its headers as a ``_list`` of ``(name, lower-case name,
    value)`` triples (every httpx and httpx2 release so far). Then the transports hand that list
    to Rust as it is, and build a rewritten request's headers without normalising each one again
    (which costs more than the whole rewrite); otherwise they go through ``raw`` and the
    constructor."""
    probe = http.Headers([(b"X-Probe", b"1")])
    return getattr(probe, "_list", None) == [(b"X-Probe", b"x-probe", b"1")]


def _items(headers: Any, triples: bool) -> Any:
    """The headers for Rust: httpx's own list of triples when it has one, else ``raw`` pairs."""
    return headers._list if triples else headers.raw


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


def _where(request: Any) -> str:
    # Host and path only: a query string may carry a credential.
    return f"{request.method} {request.url.host}{request.url.path}"


def _origin(request: Any) -> str:
    """``host[:port]`` of the request (what a passthrough engine's 403 record names)."""
    netloc: bytes = request.url.netloc
    return netloc.decode("ascii", "replace")


def _final(action: str, response: Any, error: BaseException | None) -> Any:
    """The call's answer once the engine says it ends (``return`` or ``give_up``): the error, or
    the response; a response given up on is marked ``x-should-retry: false`` so the SDK does
    not retry it again (as the Rust retry layer marks it)."""
    if action == "give_up" and response is not None:
        response.headers["x-should-retry"] = "false"
    if error is not None:
        raise error
    return response


def _failure_error(failure: Failure) -> TowerAoaiError:
    kind = failure.kind
    if kind == "blocked":
        return BlockedError(failure.message, failure.record, failure.support_request)
    if kind == "overloaded":
        return OverloadedError(failure.message)
    if kind == "no_backend":
        return NoBackendError(failure.message)
    return DeadlineExceededError(failure.message)


#: The statuses whose body start the engine classifies on: ``Call.needs_body`` asked once, not
#: across the Rust boundary on every response.
_NEEDS_BODY = frozenset(status for status in range(100, 1000) if Call.needs_body(status))

#: Parsed backend URLs kept per transport (httpx's URL parser costs more than the whole Rust
#: decision); a handful of deployments x API versions x backends in practice.
_URL_CACHE_SIZE = 256


#: How long ``Transport.close`` waits for attempts that lost a race and still run (each is
#: bounded by the inner transport's own timeouts too), in seconds.
CLOSE_GRACE = 10.0

#: The auth headers a rewritten request loses before its backend's own is set (lower-case).
_REMOVED = frozenset(REWRITE_REMOVES)


def _rewritten_headers(
    items: Any, triples: bool, host: bytes, auth: tuple[bytes, bytes] | None, length: bytes | None
) -> list[Any]:
    """The request's headers edited by the backend's plan, as ``Backends::rewritten`` edits a
    Rust request: ``host`` (if present) and, with a new body, ``content-length`` (if present)
    replaced in place, one value each; every auth header dropped, then the backend's added. Only
    these few ever cross into Rust; the rest are kept as they are."""
    out: list[Any] = []
    replaced: set[bytes] = set()
    for item in items:
        lower = item[1] if triples else item[0].lower()
        if lower in _REMOVED:
            continue
        new = host if lower == b"host" else length if lower == b"content-length" else None
        if new is not None:
            if lower in replaced:
                continue  # a name given twice keeps one value, the new one
            replaced.add(lower)
            item = (item[0], item[1], new) if triples else (item[0], new)
        out.append(item)
    if auth is not None:
        out.append((auth[0], auth[0], auth[1]) if triples else auth)
    return out


@functools.cache
def _bare_headers(http: ModuleType) -> bool:
    """Whether an empty ``http.Headers`` holds nothing but its ``_list`` and ``_encoding`` (every
    httpx and httpx2 release so far): then a rewritten request's headers are made without the
    constructor, whose type checks (``isinstance(None, Mapping)``) cost more than the rest of
    the copy."""
    return vars(http.Headers()) == {"_list": [], "_encoding": None}


def _rewrite(http: ModuleType, urls: dict[str, Any], request: Any, attempt: Attempt, triples: bool) -> Any:
    """The request as the attempt's backend needs it (host, deployment, model, auth)."""
    # The plan reads only the path and query (the backend's origin replaces the request's):
    # `raw_path` is a few string operations where `str(url)` rebuilds the whole URL.
    url, host, auth, body = attempt.plan(request.url.raw_path.decode("ascii"), request.content)
    target = urls.get(url)
    if target is None:
        if len(urls) >= _URL_CACHE_SIZE:
            urls.clear()
        target = urls[url] = http.URL(url)
    length = None if body is None else str(len(body)).encode()
    edited = _rewritten_headers(_items(request.headers, triples), triples, host, auth, length)
    if triples:
        # Names from httpx's own triples or from Rust (valid, lower-case): no checks again.
        if _bare_headers(http):
            headers = object.__new__(http.Headers)
            vars(headers).update(_list=edited, _encoding=None)
        else:
            headers = http.Headers()
            headers._list = edited
    else:
        headers = http.Headers(edited)
    # A copy of the request with every attribute it has (whatever the httpx version), without
    # `Request.__init__`, which would parse the (cached) URL and the headers again. The original
    # stream is a replayable ByteStream (the request was read); headers carry the rewritten host
    # and, for a rewritten body, its length.
    sent = object.__new__(type(request))
    attributes = vars(sent)
    attributes.update(vars(request))
    attributes.update(url=target, headers=headers, extensions=dict(request.extensions))
    if body is not None:
        sent.stream = http.ByteStream(body)
        attributes.pop("_content", None)  # the new body is read from its stream
    return sent


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


#: What one attempt came to: (response or None, transport error or None, the engine's decision).
_Sent = tuple[Any, "BaseException | None", Any]


def _hedging(engine: Engine) -> bool:
    """Whether calls may be hedged at all: several backends, hedging on."""
    return not engine.passthrough and len(engine.backends) > 1 and engine.hedge_quantile is not None


#: An attempt of a hedged call and what it came to: (attempt, response, error, decision).
_Answer = tuple[Attempt, Any, "BaseException | None", Any]


def _take(
    request: Any, call: Call, done: Any, attempts: dict[Any, Attempt], consumed: set[Any], answers: list[_Answer]
) -> _Answer | None:
    """Takes the answers of a hedged call's finished attempts (`done`: futures or tasks, keys of
    `attempts`) into `answers`, and returns the one that ends the call: a success first, then an
    answer retrying cannot help. ``None`` while the call waits for its other attempt (a failure
    waits for it)."""
    for future in done:
        consumed.add(future)
        response, error, after = future.result()
        answers.append((attempts[future], response, error, after))
        _log_attempt(request, call, attempts[future], response, after)
    final = [a for a in answers if a[3][0] != "retry"]
    final.sort(key=lambda a: a[3][0] != "return")
    return final[0] if final else None


def _log_hedge(request: Any, primary: Attempt, delay: float, hedge: Attempt) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s: backend %s slower than %.3f s; hedging to backend %s",
            _where(request),
            primary.backend,
            delay,
            hedge.backend,
        )


def _in_thread(fn: Callable[..., _Sent], *args: Any) -> concurrent.futures.Future[_Sent]:
    """Runs ``fn(*args)`` on a thread of its own, in a copy of the caller's context (contextvars:
    tracing spans, request ids), and returns its future. A daemon thread, not a pool's: an
    attempt that lost a race runs on until its answer (bounded by the inner transport's
    timeouts), and must never hold up a new call's attempt, nor the interpreter's exit."""
    future: concurrent.futures.Future[_Sent] = concurrent.futures.Future()
    context = contextvars.copy_context()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = context.run(fn, *args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name="tower_aoai-attempt", daemon=True).start()
    return future


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    """Resolves a queue waiter, unless the wake, the timer or a cancellation came first."""
    if not waiter.done():
        waiter.set_result(value)


if sys.version_info >= (3, 11):

    async def _next_within(chunks: AsyncIterator[bytes], seconds: float) -> bytes:
        """The next chunk, within `seconds` (else `TimeoutError`), read in the caller's task."""
        async with asyncio.timeout(seconds):
            return await chunks.__anext__()

else:  # pragma: no cover - Python 3.10 has no `asyncio.timeout`

    async def _next_within(chunks: AsyncIterator[bytes], seconds: float) -> bytes:
        """The next chunk, within `seconds` (else `TimeoutError`). On 3.10 `wait_for` can lose a
        cancellation that lands as the chunk arrives (a stdlib limitation)."""
        return await asyncio.wait_for(chunks.__anext__(), seconds)


class _Base:
    _http: ClassVar[ModuleType]
    _engine: Engine
    #: Whether the engine sends requests where they point (no backends): fixed at construction.
    _passthrough: bool
    #: Whether httpx's headers can be handed over as its own triples (``_header_triples``).
    _triples: bool
    #: The stream class that holds a success's lease (``_leased_stream_class``).
    _leased: type
    _inner: Any
    #: Attempts of this transport that ended (a queued call waits for this to move).
    _ends: int
    _urls: dict[str, Any]

    def _holds_permit(self, response: Any) -> bool:
        """Whether an attempt's answer keeps its permit (a success's body, until it ends, which
        wakes the queue then); any other end of an attempt gave its permit back at once."""
        return response is not None and isinstance(response.stream, self._leased)

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
    """The synchronous call loop (``handle_request``), with hedging: a call the engine gives a
    hedge delay runs its attempt on a thread of its own; if it is still running after the delay,
    a second attempt goes to another backend (if the hedge budget allows) on another thread, and
    the first successful answer wins. The loser is cancelled in the engine at once (its permit
    back, the router told); a blocking request cannot be interrupted, so it runs on in its thread
    until its answer, which is closed unread (``close`` waits for it)."""

    _sleep: Callable[[float], None]
    #: Guards `_waiters`, `_ends` and `_losers`. Re-entrant: a response collected by the garbage
    #: collector ends its lease (and wakes the line) on whatever thread allocated, which may be
    #: one that holds this lock.
    _ended: threading.RLock
    #: The queued calls, first in line first: a returned permit wakes the first alone.
    _waiters: deque[threading.Event]
    #: Whether calls may be hedged at all (several backends, hedging on).
    _hedges: bool
    #: Attempts that lost a race and still run on their threads.
    _losers: set[concurrent.futures.Future[_Sent]]

    def _setup(
        self,
        transport: Any,
        engine: Engine | None,
        sleep: Callable[[float], None] | None,
        settings: dict[str, Any],
    ) -> None:
        self._engine = _engine(engine, settings)
        self._passthrough = self._engine.passthrough
        self._triples = _header_triples(self._http)
        self._leased = _leased_stream_class(self._http)
        self._inner = transport if transport is not None else self._http.HTTPTransport()
        self._sleep = time.sleep if sleep is None else sleep
        self._ended = threading.RLock()
        self._ends = 0
        self._waiters = deque()
        self._urls = {}
        self._hedges = _hedging(self._engine)
        self._losers = set()

    def handle_request(self, request: Any) -> Any:
        """Sends ``request`` as the engine decides; returns the final response."""
        request.read()  # replayable from here on
        call = self._engine.start(request.content)
        # Whether a returned permit just woke this call from the queue: it then passes the wake
        # on when the engine says so (it took its permit and room is left, or it fails).
        woken = False
        while True:
            seen = self._ends
            step, value = call.next()
            if woken and step != "queue":
                woken = False
                if call.passes_wake_on:
                    self._wake_one()
            if step == "send":
                assert isinstance(value, Attempt)
                delay = call.hedge_delay(value) if self._hedges else None
                if delay is None:
                    try:
                        response, error, after = self._attempt(request, call, value)
                    except BaseException:
                        value.cancel()  # its permit goes back (an outcome, once fed, took it)
                        self._attempt_ended()
                        raise
                    if not self._holds_permit(response):
                        self._attempt_ended()
                    _log_attempt(request, call, value, response, after)
                else:
                    response, error, after = self._race(request, call, value, delay)
                action = after[0]
                if action == "retry":
                    if response is not None:
                        response.close()
                    continue
                return _final(action, response, error)
            if step == "wait":
                assert isinstance(value, float)
                _log_wait(request, "waiting", value)
                self._sleep(value)
            elif step == "queue":
                assert isinstance(value, float)
                _log_wait(request, "queueing for a permit up to", value)
                try:
                    woken = self._queue(value, seen, front=woken)
                except BaseException:
                    call.forget()  # it leaves the queue (queue_depth) now, not when collected
                    raise
            else:
                assert isinstance(value, Failure)
                logger.info("%s: %s", _where(request), value.message)
                raise _failure_error(value)

    def _race(self, request: Any, call: Call, primary: Attempt, delay: float) -> _Sent:
        """Runs `primary` on a thread, hedged after `delay` s if it is still running and the
        engine allows a hedge; returns the winner's (response, error, decision), as the async
        `_race` does. The loser is cancelled in the engine at once (its permit back); its blocking
        request cannot be interrupted, so it runs on in its thread and its answer is closed when
        it comes (`_discard`)."""
        first = _in_thread(self._attempt, request, call, primary)
        attempts: dict[concurrent.futures.Future[_Sent], Attempt] = {first: primary}
        consumed: set[concurrent.futures.Future[_Sent]] = set()
        try:
            early, _ = concurrent.futures.wait({first}, timeout=delay)
            if not early:
                hedge = call.hedge(primary)
                if hedge is not None:
                    _log_hedge(request, primary, delay, hedge)
                    attempts[_in_thread(self._attempt, request, call, hedge)] = hedge
            pending = set(attempts)
            answers: list[_Answer] = []
            winner = None
            while pending and winner is None:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                winner = _take(request, call, done, attempts, consumed, answers)
            winner = winner or answers[-1]
            for answer in answers:
                if answer is not winner and answer[1] is not None:
                    answer[1].close()  # a losing success gives its permit back here
            return winner[1], winner[2], winner[3]
        finally:
            # The loser (or both, when the caller is interrupted) is cancelled in the engine now:
            # its permit goes back and the router counts it cancelled, as in the async race. Its
            # request runs on in its thread (a blocking read cannot be interrupted); when it ends,
            # its answer is closed unread (`_discard`).
            for future, attempt in attempts.items():
                if attempt.open and logger.isEnabledFor(logging.DEBUG):
                    logger.debug("%s: cancelled the attempt to backend %s", _where(request), attempt.backend)
                attempt.cancel()  # a no-op once the attempt has its outcome
                if future not in consumed:
                    with self._ended:
                        self._losers.add(future)
                    future.add_done_callback(self._discard)
            self._attempt_ended()

    def _discard(self, future: concurrent.futures.Future[_Sent]) -> None:
        """The end of an attempt that lost a race and ran on: its answer, if it got one before it
        was cancelled, is closed (a success's permit goes back with it). Cancelled first, it
        raised when it came to feed the engine, and closed its answer itself."""
        try:
            if not future.cancelled() and future.exception() is None:
                response = future.result()[0]
                if response is not None:
                    response.close()
        except Exception:  # a broken connection's close: nothing is left to give back
            logger.debug("closing the answer of a cancelled attempt failed", exc_info=True)
        finally:
            with self._ended:
                self._losers.discard(future)
            self._attempt_ended()

    def _attempt(self, request: Any, call: Call, attempt: Attempt) -> tuple[Any, BaseException | None, Any]:
        """Sends one attempt; returns (response or None, transport error or None, decision)."""
        sent = request if self._passthrough else _rewrite(self._http, self._urls, request, attempt, self._triples)
        response = None
        try:
            response = self._inner.handle_request(sent)
            status, headers = response.status_code, _items(response.headers, self._triples)
            if status in _NEEDS_BODY:
                if self._passthrough:
                    call.set_origin(_origin(request))  # named in a 403's support record
                prefix = self._read_prefix(response, call)
                after, lease = attempt.on_response_streamed(status, headers, _for_classification(prefix, response))
            else:
                after, lease = attempt.on_response_streamed(status, headers)
            if lease is not None:
                if response.is_stream_consumed:
                    # The inner transport read the body already (a mock, a cache): it has ended.
                    lease.finish()
                else:
                    response.stream = self._leased(response.stream, lease, self._attempt_ended)
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

    def _queue(self, timeout: float, seen: int, front: bool) -> bool:
        """Waits in line for a permit, at most `timeout` s; whether a returned permit woke it.
        A call woken that must queue again goes back to the front (`front`), keeping its place.
        An attempt that ended since the call looked (`seen`) means no wait: it looks again, still
        the woken one if it was (`front`)."""
        waiter = threading.Event()
        with self._ended:
            if self._ends != seen:
                return front
            if front:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
        try:
            if waiter.wait(timeout):
                return True
        except BaseException:
            self._leave(waiter)
            if waiter.is_set():
                self._wake_one()  # woken, then interrupted: the next in line gets the wake
            raise
        self._leave(waiter)
        return waiter.is_set()  # a wake that came with the timeout still counts

    def _leave(self, waiter: threading.Event) -> None:
        with self._ended:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # woken: `_wake_one` took it out of the line

    def _wake_one(self) -> None:
        """Wakes the first call in line, if any."""
        with self._ended:
            if self._waiters:
                self._waiters.popleft().set()

    def _attempt_ended(self) -> None:
        # Under the lock a queued call registers under after it compares `_ends` (attempts end
        # on any thread: stream ends, hedge losers): either it sees the new count, or this sees
        # it in line and wakes it. One call, not all: with thousands queued, waking all on every
        # return costs each a look at the engine per permit.
        with self._ended:
            self._ends += 1
            if self._waiters:
                self._waiters.popleft().set()

    def _read_prefix(self, response: Any, call: Call) -> bytes:
        # A blocking read cannot be interrupted: the bound is checked between chunks, and a single
        # stalled read is bounded by the inner transport's read timeout.
        original = response.stream
        rest = iter(original)
        chunks: list[bytes] = []
        size = 0
        done = False
        limit = call.error_body_wait()
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
        """Closes the inner transport, after the attempts that lost a race ended (their answers
        closed, their permits back), waiting for them at most :data:`CLOSE_GRACE` seconds."""
        with self._ended:
            losers = list(self._losers)
        if losers:
            concurrent.futures.wait(losers, timeout=CLOSE_GRACE)
        self._inner.close()


class AsyncDriver(_Base):
    """The asynchronous call loop (``handle_async_request``), with hedging: when the engine gives
    an attempt a hedge delay and the attempt is still running after it, a second attempt goes to
    another backend (if the hedge budget allows); the first successful answer wins and the other
    attempt is cancelled (its request task cancelled, its connection closed, its permit back)."""

    _sleep: Callable[[float], Awaitable[None]]
    #: The queued calls, first in line first: a returned permit wakes the first alone.
    _waiters: deque[asyncio.Future[bool]]
    #: Whether calls may be hedged at all (several backends, hedging on).
    _hedges: bool

    def _setup(
        self,
        transport: Any,
        engine: Engine | None,
        sleep: Callable[[float], Awaitable[None]] | None,
        settings: dict[str, Any],
    ) -> None:
        self._engine = _engine(engine, settings)
        self._passthrough = self._engine.passthrough
        self._triples = _header_triples(self._http)
        self._leased = _leased_stream_class(self._http)
        self._inner = transport if transport is not None else self._http.AsyncHTTPTransport()
        self._sleep = asyncio.sleep if sleep is None else sleep
        self._waiters = deque()
        self._ends = 0
        self._urls = {}
        self._hedges = _hedging(self._engine)

    async def handle_async_request(self, request: Any) -> Any:
        """Sends ``request`` as the engine decides; returns the final response."""
        await request.aread()  # replayable from here on
        call = self._engine.start(request.content)
        # Whether a returned permit just woke this call from the queue (see the sync loop).
        woken = False
        while True:
            seen = self._ends
            step, value = call.next()
            if woken and step != "queue":
                woken = False
                if call.passes_wake_on:
                    self._wake_one()
            if step == "send":
                assert isinstance(value, Attempt)
                delay = call.hedge_delay(value) if self._hedges else None
                if delay is None:
                    try:
                        response, error, after = await self._attempt(request, call, value)
                    except BaseException:
                        value.cancel()  # its permit goes back (an outcome, once fed, took it)
                        self._attempt_ended()
                        raise
                    if not self._holds_permit(response):
                        self._attempt_ended()
                    _log_attempt(request, call, value, response, after)
                else:
                    response, error, after = await self._race(request, call, value, delay)
                action = after[0]
                if action == "retry":
                    if response is not None:
                        await response.aclose()
                    continue
                return _final(action, response, error)
            if step == "wait":
                assert isinstance(value, float)
                _log_wait(request, "waiting", value)
                await self._sleep(value)
            elif step == "queue":
                assert isinstance(value, float)
                _log_wait(request, "queueing for a permit up to", value)
                try:
                    woken = await self._queue(value, seen, front=woken)
                except BaseException:
                    call.forget()  # it leaves the queue (queue_depth) now, not when collected
                    raise
            else:
                assert isinstance(value, Failure)
                logger.info("%s: %s", _where(request), value.message)
                raise _failure_error(value)

    async def _queue(self, timeout: float, seen: int, front: bool) -> bool:
        """Waits in line for a permit, at most `timeout` s; whether a returned permit woke it.
        A call woken that must queue again goes back to the front (`front`), keeping its place.
        An attempt that ended since the engine was asked (`seen`, the count of ends then) may have
        found nobody in line to wake: the call does not wait but looks again, still the woken one
        if it was (`front`), as the sync `_queue` does.

        The waiter is resolved by whichever comes first, the wake (`True`) or its own timer
        (`False`), and awaited as it is: not through `asyncio.wait_for`, which before Python 3.12
        returns a result that arrived in the same turn as the caller's cancellation, and so loses
        the cancellation."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        if front:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        woken = False
        timer = None
        try:
            # Compared after standing in line: an end on another thread, or one here (a body
            # garbage-collected as the waiter was made), either saw this call in line and woke
            # it, or moved `_ends`. A wake sent to the cancelled waiter goes on to the next.
            if self._ends != seen:
                waiter.cancel()
                return front
            timer = loop.call_later(timeout, _resolve, waiter, False)
            woken = await waiter
            return woken
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._wake_one()  # woken, then cancelled: the next in line gets the wake
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not woken:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass  # `_wake_one` took it out of the line

    def _wake_one(self) -> None:
        """Wakes the first call in line that still waits, if any (on its own loop)."""
        while True:
            try:
                # Not `while self._waiters`: another thread may take the last one in between.
                waiter = self._waiters.popleft()
            except IndexError:
                return
            if waiter.done():
                continue
            try:
                waiter.get_loop().call_soon_threadsafe(self._wake, waiter)
            except RuntimeError:
                continue  # its loop was closed with the call still queued: nobody to wake there
            return

    def _wake(self, waiter: asyncio.Future[bool]) -> None:
        if waiter.done():
            self._wake_one()  # it stopped waiting (timed out, cancelled) meanwhile: the next one
        else:
            waiter.set_result(True)

    def _attempt_ended(self) -> None:
        self._ends += 1
        # One call, not all: with thousands queued, waking all on every return costs each a
        # look at the engine per permit. Nothing to do when nobody queues (the fast path).
        if self._waiters:
            self._wake_one()

    async def _race(self, request: Any, call: Call, primary: Attempt, delay: float) -> _Sent:
        """Runs `primary`, hedged after `delay` s if it is still running and the engine allows a
        hedge; returns the winner's (response, error, decision). The first answer that ends the
        call wins (a success, or an answer retrying cannot help); a failure waits for the other
        attempt. The loser's task is cancelled, its response closed and its permit given back."""
        first: asyncio.Future[_Sent] = asyncio.ensure_future(self._attempt(request, call, primary))
        attempts: dict[asyncio.Future[_Sent], Attempt] = {first: primary}
        consumed: set[asyncio.Future[_Sent]] = set()
        try:
            early, _ = await asyncio.wait({first}, timeout=delay)
            if not early:
                hedge = call.hedge(primary)
                if hedge is not None:
                    _log_hedge(request, primary, delay, hedge)
                    attempts[asyncio.ensure_future(self._attempt(request, call, hedge))] = hedge
            pending = set(attempts)
            answers: list[_Answer] = []
            winner = None
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = _take(request, call, done, attempts, consumed, answers)
            winner = winner or answers[-1]
            for answer in answers:
                if answer is not winner and answer[1] is not None:
                    await answer[1].aclose()  # a losing success gives its permit back here
            return winner[1], winner[2], winner[3]
        finally:
            # The loser (or both, when the caller is cancelled): cancel its request, which closes
            # its connection; a response that arrived meanwhile is closed; its permit goes back.
            left = [t for t in attempts if t not in consumed]
            for task in left:
                task.cancel()
            if left:
                await asyncio.gather(*left, return_exceptions=True)
            for task in left:
                if not task.cancelled() and task.exception() is None and task.result()[0] is not None:
                    await task.result()[0].aclose()
            for attempt in attempts.values():
                if attempt.open and logger.isEnabledFor(logging.DEBUG):
                    logger.debug("%s: cancelled the attempt to backend %s", _where(request), attempt.backend)
                attempt.cancel()  # a no-op once the attempt has its outcome
            self._attempt_ended()

    async def _attempt(self, request: Any, call: Call, attempt: Attempt) -> tuple[Any, BaseException | None, Any]:
        """Sends one attempt; returns (response or None, transport error or None, decision)."""
        sent = request if self._passthrough else _rewrite(self._http, self._urls, request, attempt, self._triples)
        response = None
        try:
            response = await self._inner.handle_async_request(sent)
            status, headers = response.status_code, _items(response.headers, self._triples)
            if status in _NEEDS_BODY:
                if self._passthrough:
                    call.set_origin(_origin(request))  # named in a 403's support record
                prefix = await self._read_prefix(response, call)
                after, lease = attempt.on_response_streamed(status, headers, _for_classification(prefix, response))
            else:
                after, lease = attempt.on_response_streamed(status, headers)
            if lease is not None:
                if response.is_stream_consumed:
                    # The inner transport read the body already (a mock, a cache): it has ended.
                    lease.finish()
                else:
                    response.stream = self._leased(response.stream, lease, self._attempt_ended)
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
        limit = call.error_body_wait()
        deadline = time.monotonic() + limit
        while size < MAX_ERROR_BODY:
            try:
                # Each read is bounded too, so a server that sends headers and then stalls cannot
                # hold the call past the wait.
                chunk = await _next_within(rest, max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                done = True
                break
            except asyncio.TimeoutError:
                # The interrupted read ended the stream: hand up what arrived, nothing after it.
                logger.warning("error body stalled for %.1f s; classifying on what arrived", limit)
                done = True
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                logger.warning("error body still arriving after %.1f s; classifying on what arrived", limit)
                break
        prefix = b"".join(chunks)
        response.stream = _prefixed_stream_class(self._http)(prefix, None if done else rest, original)
        return prefix

    async def aclose(self) -> None:
        """Closes the inner transport."""
        await self._inner.aclose()

