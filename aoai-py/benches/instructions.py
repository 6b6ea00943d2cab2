"""What the Python transports add per request, in instructions: a figure machine load cannot move.

``bench/overhead.py`` measures time, which on a shared 2-core machine moves by several points
between runs. This runs each of its six variants (sync and async; bare httpx2, passthrough, one
backend) alone in a client process under valgrind's callgrind, which counts the instructions the
client executes (the loopback server runs natively, uncounted), at two request counts: the
difference, divided by the difference in requests, is the cost of one request without the fixed
cost of starting the interpreter, the client and the connections.

    python aoai-py/benches/instructions.py [--requests 200 1400] [--concurrency 16]

Needs valgrind and the ``aoai-bench`` release binary (``AOAI_BENCH_BIN``, as overhead.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import overhead  # noqa: E402
from _common import Server, binary, callgrind_instructions  # noqa: E402

KINDS = ("sync", "async")


def run_one(kind: str, index: int, requests: int, concurrency: int) -> None:
    """The child: one variant, `requests` requests, nothing else."""
    bench_bin = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    with Server([str(bench_bin), "serve-zero"], startup_timeout=120) as server:
        url = f"{server.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        if kind == "sync":
            _, client = overhead.sync_variants(server.url)[index]
            overhead.sync_round(client, url, requests)
            client.close()
            return

        async def go() -> None:
            _, aclient = overhead.async_variants(server.url)[index]
            await overhead.async_round(aclient, url, requests, concurrency)
            await aclient.aclose()

        asyncio.run(go())


def instructions(kind: str, index: int, requests: int, concurrency: int) -> int:
    """Instructions the client executed for `requests` requests (startup included)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    argv = [sys.executable, __file__, "--one", kind, str(index), str(requests), "--concurrency", str(concurrency)]
    return callgrind_instructions(argv, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs=2, default=(200, 1400), metavar=("SMALL", "LARGE"))
    ap.add_argument("--concurrency", type=int, default=16, help="async callers")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "INDEX", "REQUESTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.concurrency)
        return 0
    small, large = args.requests
    if not 0 < small < large:
        ap.error("--requests SMALL LARGE with 0 < SMALL < LARGE")
    sync_clients = overhead.sync_variants("http://127.0.0.1:1")
    names = {
        "sync": [n for n, _ in sync_clients],
        "async": [n for n, _ in overhead.async_variants("http://127.0.0.1:1")],
    }
    for _, client in sync_clients:
        client.close()
    jobs = [(kind, i, n) for kind in KINDS for i in range(len(names[kind])) for n in (small, large)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda j: instructions(j[0], j[1], j[2], args.concurrency), jobs)
        counts = dict(zip(jobs, done, strict=True))
    for kind in KINDS:
        callers = 1 if kind == "sync" else args.concurrency
        # An async round sends whole batches: as many requests per caller as it takes.
        sent = [n if kind == "sync" else -(-n // callers) * callers for n in (small, large)]
        print(f"Python, {kind}, {callers} caller(s) · instructions per request ({sent[1]} - {sent[0]} requests)")
        per = [
            (counts[(kind, i, large)] - counts[(kind, i, small)]) / (sent[1] - sent[0])
            for i in range(len(names[kind]))
        ]
        for name, value in zip(names[kind], per, strict=True):
            print(f"  {name:<40} {value:>11,.0f}  {value - per[0]:>+9,.0f}  {(value / per[0] - 1) * 100:>5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
