"""What the Rust layers add per request, in instructions: a figure machine load cannot move.

`aoai-bench overhead` measures time, which on a shared 2-core machine moves by tens of percent
between runs. This runs the same binary under valgrind's callgrind, which counts the
instructions executed by the client's thread (the loopback server runs on a thread of its own
and is left out, as it would be on another machine; one caller), and derives per request:

- the bare hyper request: from two bare-only runs of different sizes (their difference cancels
  the fixed cost of starting runtimes, the server and the connection);
- each variant: a run of the bare client and the variant with the same number of requests (in
  one round; the order they run in does not change the count), less the bare-only run of that
  size.

"tower stock: Retry + ConcurrencyLimit" is a calibration floor: tower's own retry (copying each
request) over tower's own concurrency limit, what any retrying, limiting tower stack pays.

    python bench/instructions.py [--requests 3000] [--only SUBSTRING]

Needs valgrind (Debian: `apt-get install valgrind`). Writes `bench/results/instructions.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, binary, callgrind_instructions, machine  # noqa: E402

VARIANTS = [
    "RetryLayer",
    "tower stock: Retry + ConcurrencyLimit",
    "RetryLayer + AdaptiveConcurrencyLayer",
    "Stack",
    "layers composed (retry, route, limit)",
    "layers composed, hedging off",
]
# `aoai-bench overhead` warms every variant up with min(requests, 2000) calls before the round.
WARM_UP = 2000


def instructions(bench: Path, requests: int, only: str) -> int:
    """Instructions the client thread (the main thread: the client runs on a current-thread
    runtime there) executes in one `aoai-bench overhead` run of the bare client and `only`."""
    argv = [str(bench), "overhead", "--requests", str(requests), "--rounds", "1", "--concurrency", "1", "--only", only]
    return callgrind_instructions(argv, main_thread_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per variant (> 2000)")
    parser.add_argument("--only", default="", help="run only the variants containing this")
    args = parser.parse_args()
    if args.requests <= WARM_UP:
        sys.exit("--requests must be above 2000 (the warm-up)")
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    bench = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    calls = args.requests + WARM_UP
    small = 1000 + 1000  # --requests 1000: 1000 warm-up calls and 1000 measured
    bare_small = instructions(bench, 1000, "bare hyper")
    bare = instructions(bench, args.requests, "bare hyper")
    per_bare = (bare - bare_small) / (calls - small)
    rows = [{"variant": "bare hyper client", "instructions_per_request": per_bare, "added": 0.0}]
    for name in VARIANTS:
        if args.only not in name:
            continue
        total = instructions(bench, args.requests, name)
        per = (total - bare) / calls
        rows.append(
            {
                "variant": name,
                "instructions_per_request": per,
                "added": per - per_bare,
                "overhead_ratio": per / per_bare - 1.0,
            }
        )
    print(f"instructions per request (callgrind; the client's thread; {calls} calls each)")
    print(f"{'variant':<40} {'per request':>12} {'added':>9} {'overhead':>9}")
    for r in rows:
        ratio = f"{100 * r.get('overhead_ratio', 0.0):8.1f}%"
        print(f"{r['variant']:<40} {r['instructions_per_request']:>12,.0f} {r['added']:>9,.0f} {ratio}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine(), "requests": args.requests, "rows": rows}
    (RESULTS / "instructions.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
