"""The transports' fast path: what a call that needs no waiting costs, in microseconds.

Two figures, best of 5 rounds (run against a release build: ``maturin develop --release``):

- the Rust calls a no-wait, successful call makes (``Engine.start`` with the body for the token
  estimate, ``Call.next``, ``Call.needs_body``, ``Attempt.on_response_streamed``, and the
  ``Lease.finish`` at the body's end; plus ``Attempt.plan`` with backends), with three response
  headers and with the fourteen of an Azure answer (the engine converts only those it reads);
- ``Transport.handle_request`` over an inner transport that returns a fresh in-memory response,
  read and closed as the SDK does (the read ends the lease): the whole Python + Rust overhead of
  the transport; and the same for ``AsyncTransport.handle_async_request`` on one event loop.

Usage: ``python aoai-py/benches/fastpath.py``. Not a test: it asserts nothing and prints a table.
"""

from __future__ import annotations

import asyncio
import time
import timeit
from typing import Any

import httpx2

import tower_aoai

BODY = b'{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","max_tokens":64}'
HEADERS = [
    (b"content-type", b"application/json"),
    (b"apim-request-id", b"abc"),
    (b"x-ratelimit-remaining-tokens", b"9000"),
]
# What an Azure success carries (see shared/AZURE.md): the engine reads 5 of these 14.
AZURE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"250"),
    (b"date", b"Sun, 22 Nov 2026 14:00:00 GMT"),
    (b"apim-request-id", b"1b1e7d2c-6c4e-4b0e-9f3a-2f6f0c1d2e3f"),
    (b"x-request-id", b"2b1e7d2c-6c4e-4b0e-9f3a-2f6f0c1d2e3f"),
    (b"x-ms-region", b"East US"),
    (b"x-ratelimit-remaining-requests", b"99"),
    (b"x-ratelimit-remaining-tokens", b"99000"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"x-content-type-options", b"nosniff"),
    (b"azureml-model-session", b"d123-20261101"),
    (b"x-ms-client-request-id", b"3b1e7d2c-6c4e"),
    (b"cmp-upstream-response-duration", b"412"),
    (b"x-envoy-upstream-service-time", b"415"),
]
URL = "https://sdk.example/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


def best(fn: Any, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def rust_calls(engine: tower_aoai.Engine, rewrite: bool, lease: bool = True, headers: Any = HEADERS) -> None:
    call = engine.start(BODY)
    step, attempt = call.next()
    assert isinstance(attempt, tower_aoai.Attempt), step
    if rewrite:
        attempt.plan(URL, BODY)
    tower_aoai.Call.needs_body(200)
    if not lease:
        attempt.on_response(200, headers)
        return
    _, held = attempt.on_response_streamed(200, headers)
    assert held is not None
    held.finish()


class Prebuilt(httpx2.BaseTransport):
    """Answers every request with a new in-memory response (a response's stream is wrapped by
    the transport, so one response object cannot be served twice)."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=HEADERS, content=b"{}")


class AsyncPrebuilt(httpx2.AsyncBaseTransport):
    """The async :class:`Prebuilt`."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=HEADERS, content=b"{}")


def abest(transport: httpx2.AsyncBaseTransport, request: httpx2.Request, number: int) -> float:
    """Best of 5 rounds of `number` sequential requests, read and closed, in microseconds each."""

    async def rounds() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(number):
                response = await transport.handle_async_request(request)
                await response.aread()
                await response.aclose()
            times.append(time.perf_counter() - start)
        return min(times) / number * 1e6

    return asyncio.run(rounds())


def read(transport: httpx2.BaseTransport, request: httpx2.Request) -> None:
    response = transport.handle_request(request)
    response.read()
    response.close()


def main() -> None:
    backend = tower_aoai.Backend("a", "https://a.example", deployment="d", api_key="k")
    request = httpx2.Request("POST", URL, content=BODY, headers={"api-key": "sdk"})
    inner = Prebuilt()
    ainner = AsyncPrebuilt()
    passthrough = tower_aoai.Engine()
    with_backend = tower_aoai.Engine(backends=[backend])
    plain = tower_aoai.Transport(inner)
    routed = tower_aoai.Transport(inner, backends=[backend])
    rows = [
        ("Rust calls, passthrough", best(lambda: rust_calls(passthrough, False), 100_000)),
        ("Rust calls, passthrough, permit back at the headers", best(lambda: rust_calls(passthrough, False, False), 100_000)),
        (
            "Rust calls, passthrough, a 14-header Azure answer",
            best(lambda: rust_calls(passthrough, False, headers=AZURE_HEADERS), 100_000),
        ),
        ("Rust calls, 1 backend (rewrite)", best(lambda: rust_calls(with_backend, True), 100_000)),
        ("inner transport alone, read", best(lambda: read(inner, request), 100_000)),
        ("Transport(inner).handle_request, read", best(lambda: read(plain, request), 50_000)),
        ("Transport(inner, backends=[1]).handle_request, read", best(lambda: read(routed, request), 50_000)),
        ("async inner transport alone, read", abest(ainner, request, 50_000)),
        ("AsyncTransport(inner), read", abest(tower_aoai.AsyncTransport(ainner), request, 50_000)),
        (
            "AsyncTransport(inner, backends=[1]), read",
            abest(tower_aoai.AsyncTransport(ainner, backends=[backend]), request, 50_000),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.2f} us")


if __name__ == "__main__":
    main()
