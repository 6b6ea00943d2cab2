"""What tower-aoai's Python transports add per request, against bare httpx2 transports, on
loopback against a server that answers at once (``aoai-bench serve-zero``, a hyper server).

Every variant runs in the same process, interleaved round by round in a rotating order (so
machine load hits them alike). Two figures per variant: wall time per request (what a caller
sees) and the client thread's CPU time per request (what the transport costs, less sensitive to
other load on the machine), each the median over the rounds; a variant's added time and overhead
are the medians of its per-round differences and ratios to the bare transport (paired rounds),
and the 25th and 75th percentiles of those ratios show their spread: "4.1 % (2.9–5.3)".
Sync: one caller, sequential requests (µs per request is the latency). Async: ``--concurrency``
callers on one event loop (µs per request is 1/throughput).
It also runs the Rust side (``aoai-bench overhead``) unless ``--no-rust``, and writes both to
``bench/results/overhead.json``.

    .venv/bin/python bench/overhead.py [--requests 200] [--rounds 101] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2  # noqa: E402
import tower_aoai  # noqa: E402
from _common import RESULTS, Server, binary, machine  # noqa: E402

BODY = b'{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
HEADERS = {"content-type": "application/json", "api-key": "bench-key"}


def sync_variants(base: str) -> list[tuple[str, httpx2.Client]]:
    backend = tower_aoai.Backend("loopback", base, deployment="gpt-4o", api_key="bench-key", tier=0)
    return [
        ("bare httpx2.HTTPTransport", httpx2.Client(transport=httpx2.HTTPTransport())),
        ("tower_aoai.Transport()", httpx2.Client(transport=tower_aoai.Transport())),
        (
            "tower_aoai.Transport(backends=[1])",
            httpx2.Client(transport=tower_aoai.Transport(backends=[backend])),
        ),
    ]


def async_variants(base: str) -> list[tuple[str, httpx2.AsyncClient]]:
    backend = tower_aoai.Backend("loopback", base, deployment="gpt-4o", api_key="bench-key", tier=0)
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    return [
        (
            "bare httpx2.AsyncHTTPTransport",
            httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(limits=limits)),
        ),
        (
            "tower_aoai.AsyncTransport()",
            httpx2.AsyncClient(
                transport=tower_aoai.AsyncTransport(httpx2.AsyncHTTPTransport(limits=limits))
            ),
        ),
        (
            "tower_aoai.AsyncTransport(backends=[1])",
            httpx2.AsyncClient(
                transport=tower_aoai.AsyncTransport(
                    httpx2.AsyncHTTPTransport(limits=limits), backends=[backend]
                )
            ),
        ),
    ]


Sample = tuple[float, float]  # (wall seconds, this thread's CPU seconds) per request


def sync_round(client: httpx2.Client, url: str, n: int) -> Sample:
    cpu = time.thread_time()
    start = time.perf_counter()
    for _ in range(n):
        r = client.post(url, content=BODY, headers=HEADERS)
        r.read()
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}")
    return (time.perf_counter() - start) / n, (time.thread_time() - cpu) / n


async def async_round(client: httpx2.AsyncClient, url: str, n: int, concurrency: int) -> Sample:
    per = -(-n // concurrency)

    async def caller() -> None:
        for _ in range(per):
            r = await client.post(url, content=BODY, headers=HEADERS)
            await r.aread()
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}")

    cpu = time.thread_time()
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    n = per * concurrency
    return (time.perf_counter() - start) / n, (time.thread_time() - cpu) / n


def spread(row: dict[str, Any], key: str) -> str:
    """An overhead ratio with its spread, in percent: "4.1 % (2.9–5.3)" (the median and the
    quartiles of the per-round ratios); without quartiles (older results) just "4.1 %"."""
    if row.get(key) is None:
        return "?"
    text = f"{row[key] * 100:.1f} %"
    q1, q3 = row.get(f"{key}_q1"), row.get(f"{key}_q3")
    if q1 is not None and q3 is not None:
        text += f" ({q1 * 100:.1f}–{q3 * 100:.1f})"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        f"{'variant':<40} {'wall µs/req':>11} {'requests/s':>10} {'added µs':>9} {'overhead':>22} | "
        f"{'client CPU':>10} {'added µs':>9} {'overhead':>22}"
    ]
    nan = float("nan")
    for r in rows:
        out.append(
            f"{r['variant']:<40} {r.get('us_per_request', nan):>11.1f} {r.get('requests_per_s', nan):>10.0f} "
            f"{r.get('added_us', nan):>9.1f} {spread(r, 'overhead_ratio'):>22} | "
            f"{r.get('cpu_us_per_request', nan):>10.1f} {r.get('cpu_added_us', nan):>9.1f} "
            f"{spread(r, 'cpu_overhead_ratio'):>22}"
        )
    return "\n".join(out)


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, interpolating linearly between the two closest ranks
    (``q = 0.5`` is the usual median; as ``quantile`` in aoai-bench/src/overhead.rs, and unlike
    ``statistics.quantiles`` it takes a single round)."""
    if not xs:
        raise ValueError("quantile of no data")
    s = sorted(xs)
    pos = min(max(q, 0.0), 1.0) * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired(variant: list[float], bare: list[float]) -> dict[str, float]:
    """A variant's per-round figures against the bare transport's of the same rounds: the median
    difference (``added``) and the median, 25th and 75th percentile of the ratio less one."""
    diffs = [v - b for v, b in zip(variant, bare, strict=True)]
    ratios = [v / b - 1 for v, b in zip(variant, bare, strict=True)]
    return {
        "added": quantile(diffs, 0.5),
        "ratio": quantile(ratios, 0.5),
        "ratio_q1": quantile(ratios, 0.25),
        "ratio_q3": quantile(ratios, 0.75),
    }


def summarise(names: list[str], samples: list[list[Sample]]) -> list[dict[str, Any]]:
    """Medians per variant; the added time and the overhead are the medians of each round's
    difference and ratio to the bare transport's figure *of the same round* (paired: a slow
    stretch of the machine hits both sides of a pair alike, so it does not count as overhead),
    with the quartiles of that ratio as its spread (``*_q1``, ``*_q3``)."""
    rows = []
    for name, s in zip(names, samples, strict=True):
        wall = quantile([w for w, _ in s], 0.5)
        cpu = quantile([c for _, c in s], 0.5)
        p = paired([w for w, _ in s], [w for w, _ in samples[0]])
        pc = paired([c for _, c in s], [c for _, c in samples[0]])
        rows.append(
            {
                "variant": name,
                "us_per_request": wall * 1e6,
                "requests_per_s": 1 / wall,
                "added_us": p["added"] * 1e6,
                "overhead_ratio": p["ratio"],
                "overhead_ratio_q1": p["ratio_q1"],
                "overhead_ratio_q3": p["ratio_q3"],
                "cpu_us_per_request": cpu * 1e6,
                "cpu_added_us": pc["added"] * 1e6,
                "cpu_overhead_ratio": pc["ratio"],
                "cpu_overhead_ratio_q1": pc["ratio_q1"],
                "cpu_overhead_ratio_q3": pc["ratio_q3"],
            }
        )
    return rows


def rotation(n: int, round_: int) -> list[int]:
    """The order the variants run in this round: each starts a round in turn, so none always
    follows the same one (a variant's round would otherwise inherit the state, caches and
    connections, the previous one left)."""
    return [(round_ + i) % n for i in range(n)]


def interleave(names: list[str], run: Callable[[int], Sample], rounds: int) -> list[dict[str, Any]]:
    samples: list[list[Sample]] = [[] for _ in names]
    for r in range(rounds):
        for i in rotation(len(names), r):
            samples[i].append(run(i))
    return summarise(names, samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per variant per round")
    ap.add_argument("--rounds", type=int, default=101, help="interleaved rounds (the median counts)")
    ap.add_argument("--concurrency", type=int, default=16, help="async callers")
    ap.add_argument("--no-rust", action="store_true", help="skip `aoai-bench overhead`")
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = ap.parse_args()
    if args.requests < 1 or args.rounds < 1 or not 1 <= args.concurrency <= 512:
        ap.error("--requests and --rounds must be positive, --concurrency in 1..512")

    bench_bin = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    with Server([str(bench_bin), "serve-zero"]) as server:
        base = server.url
        url = f"{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"

        variants = sync_variants(base)
        names = [n for n, _ in variants]
        for _, c in variants:  # warm-up
            sync_round(c, url, min(args.requests, 500))
        rows = interleave(names, lambda i: sync_round(variants[i][1], url, args.requests), args.rounds)
        for _, c in variants:
            c.close()
        print(
            f"Python, sync, 1 caller · {args.requests} requests x {args.rounds} rounds "
            "(medians; overhead paired per round, quartiles in brackets)"
        )
        print(table(rows), end="\n\n")
        result["python_sync"] = {"concurrency": 1, "requests": args.requests, "rounds": args.rounds, "rows": rows}

        async def run_async() -> list[dict[str, Any]]:
            avariants = async_variants(base)
            anames = [n for n, _ in avariants]
            for _, c in avariants:
                await async_round(c, url, min(args.requests, 500), args.concurrency)
            samples: list[list[Sample]] = [[] for _ in anames]
            for r in range(args.rounds):
                for i in rotation(len(avariants), r):
                    samples[i].append(await async_round(avariants[i][1], url, args.requests, args.concurrency))
            for _, c in avariants:
                await c.aclose()
            return summarise(anames, samples)

        arows = asyncio.run(run_async())
        print(
            f"Python, async, {args.concurrency} callers · {args.requests} requests x {args.rounds} rounds "
            "(medians; overhead paired per round, quartiles in brackets)"
        )
        print(table(arows), end="\n\n")
        result["python_async"] = {
            "concurrency": args.concurrency,
            "requests": args.requests,
            "rounds": args.rounds,
            "rows": arows,
        }

    if not args.no_rust:
        out = subprocess.run(
            [str(bench_bin), "overhead", "--json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        ).stdout
        result["rust"] = json.loads(out)
        for run in result["rust"]:
            print(
                f"Rust, {run['concurrency']} callers · {run['requests']} requests x {run['rounds']} rounds "
                "(medians; overhead paired per round, quartiles in brackets)"
            )
            print(table(run["rows"]), end="\n\n")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
