"""A burst of N concurrent calls through a limit of 4: tower-aoai's transports (their own queue)
against the bare httpx2 transport behind a semaphore of 4 (what a caller would write by hand), on
loopback against a server that answers at once (``aoai-bench serve-zero``), side by side in one run.

The client's CPU time per call should not grow with N: a queue that woke every queued call on
every returned permit made it O(N) per call (O(N^2) per burst). Async: N callers on one event
loop. Sync: N threads.

    .venv/bin/python bench/queue_storm.py [--async-calls 100 1000 4000] [--sync-calls 50 200 800]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2  # noqa: E402
import tower_aoai  # noqa: E402
from _common import Server, binary, machine  # noqa: E402

BODY = b'{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
HEADERS = {"content-type": "application/json"}
LIMIT = 4


def limited(**extra: Any) -> dict[str, Any]:
    """The transports' settings for a fixed limit of LIMIT and a queue wait longer than any burst."""
    return {
        "initial_concurrency": LIMIT,
        "min_concurrency": LIMIT,
        "max_concurrency": LIMIT,
        "queue_timeout": 600.0,
        **extra,
    }


async def async_burst(url: str, n: int, tower: bool) -> tuple[float, float]:
    """CPU and wall µs per call of `n` concurrent calls."""
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    inner = httpx2.AsyncHTTPTransport(limits=limits)
    transport = tower_aoai.AsyncTransport(inner, **limited()) if tower else inner
    gate = asyncio.Semaphore(n if tower else LIMIT)
    async with httpx2.AsyncClient(transport=transport, timeout=600) as client:

        async def one() -> None:
            async with gate:
                r = await client.post(url, content=BODY, headers=HEADERS)
                await r.aread()
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}")

        await asyncio.gather(*(one() for _ in range(LIMIT)))  # connections open
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


def sync_burst(url: str, n: int, tower: bool) -> tuple[float, float]:
    inner = httpx2.HTTPTransport(limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64))
    transport = tower_aoai.Transport(inner, **limited()) if tower else inner
    gate = threading.BoundedSemaphore(n if tower else LIMIT)
    start = threading.Barrier(n + 1)
    with httpx2.Client(transport=transport, timeout=600) as client, ThreadPoolExecutor(n) as pool:

        def one(_: int) -> None:
            start.wait()
            with gate:
                r = client.post(url, content=BODY, headers=HEADERS)
                r.read()
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}")

        done = pool.map(one, range(n))
        start.wait()  # every thread is up: the burst starts now
        cpu, wall = time.process_time(), time.perf_counter()
        list(done)
        return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


def table(title: str, sizes: list[int], run: Callable[[int, bool], tuple[float, float]]) -> None:
    print(title)
    print(f"{'calls':>6} | {'bare + semaphore: CPU µs/call':>29} {'wall':>7} | {'tower-aoai: CPU µs/call':>23} {'wall':>7} | {'CPU ratio':>9}")
    for n in sizes:
        bare_cpu, bare_wall = run(n, False)
        tower_cpu, tower_wall = run(n, True)
        print(f"{n:>6} | {bare_cpu:>29.0f} {bare_wall:>7.0f} | {tower_cpu:>23.0f} {tower_wall:>7.0f} | {tower_cpu / bare_cpu:>8.2f}x")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--async-calls", type=int, nargs="+", default=[100, 1000, 4000])
    ap.add_argument("--sync-calls", type=int, nargs="+", default=[50, 200, 800])
    args = ap.parse_args()
    if min(args.async_calls + args.sync_calls) < 1 or max(args.sync_calls) > 2000:
        ap.error("call counts must be positive (sync at most 2000 threads)")
    bench_bin = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    print(f"machine: {machine()}; a limit of {LIMIT}, a server that answers at once\n")
    with Server([str(bench_bin), "serve-zero"]) as server:
        url = f"{server.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        table(
            "async: N concurrent calls on one event loop",
            args.async_calls,
            lambda n, tower: asyncio.run(async_burst(url, n, tower)),
        )
        table("sync: N threads", args.sync_calls, lambda n, tower: sync_burst(url, n, tower))
    return 0


if __name__ == "__main__":
    sys.exit(main())
