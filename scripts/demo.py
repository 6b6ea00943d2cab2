"""The demonstration (run by scripts/demo.sh): about a minute of the same traffic, on the built-in
Azure OpenAI simulator, through the openai SDK as it ships and through tower-aoai, side by side.

The scenario (aoai-sim/scenarios/seed-429-regional.toml) is the second seed report: steady load,
far below quota, yet East US 2 answers 429 "high demand" because regional capacity is tight, and
from minute 2 it gets worse; Sweden Central serves the same model and is healthy. Each contender
gets a fresh simulator and the same calls at the same (virtual) times.

    python scripts/demo.py [--scenario NAME] [--duration S] [--time-scale K] [--no-rust]

Needs the simulator binary (AOAI_SIM_BIN, else built with cargo) and builds the benchmark binary
(aoai-bench: the workload schedule and the Rust stack) with cargo unless AOAI_BENCH_BIN is set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import goodput as gp  # noqa: E402
from _common import binary  # noqa: E402


def share(f: dict[str, Any], targets: list[str]) -> str:
    by = f.get("server_by_deployment") or {}
    total = sum(by.values()) or 1
    parts = [f"{by.get(t, 0) * 100 / total:.0f} % to {t.split('/')[0]}" for t in targets]
    return ", ".join(parts)


def explain(c: str, f: dict[str, Any], targets: list[str]) -> str:
    failed = f["calls"] - f["successes"]
    if c == "sdk":
        return (
            f"one endpoint, retried twice on the same region: {f['throttled_429']} 429s hit the server, "
            f"{failed} calls failed anyway ({share(f, targets)})."
        )
    who = "the same SDK over tower_aoai.AsyncTransport" if c == "tower-py" else "tower_aoai::stack::Stack over hyper"
    return (
        f"{who}; honoured the hints and moved load off the throttled region "
        f"({share(f, targets)}); {f['throttled_429']} 429s, {failed} failed."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="seed-429-regional")
    ap.add_argument("--duration", type=float, default=100.0, help="virtual seconds of arrivals")
    ap.add_argument("--time-scale", type=float, default=2.0, help="how much faster than real time")
    ap.add_argument("--no-rust", action="store_true", help="leave out the Rust stack")
    args = ap.parse_args()
    scenario_file = gp.SCENARIOS_DIR / f"{args.scenario}.toml"
    if not scenario_file.is_file():
        ap.error(f"no scenario {args.scenario!r} in {gp.SCENARIOS_DIR}")
    if not (0 < args.duration <= 3600 and 0 < args.time_scale <= 1000):
        ap.error("--duration must be in (0, 3600] and --time-scale in (0, 1000]")

    sim_bin = binary("aoai-sim", "aoai-sim", "AOAI_SIM_BIN")
    bench_bin = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    schedule = json.loads(
        subprocess.run(
            [str(bench_bin), "schedule", "--scenario", str(scenario_file), "--duration", str(args.duration)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    targets = [t["name"] for t in schedule["targets"]]
    contenders = ["sdk", "tower-py"] + ([] if args.no_rust else ["tower-rust"])
    n = len(schedule["arrivals"])
    print(
        f"tower-aoai demo: {args.scenario} ({schedule['targets'][0]['region']} throttled, "
        f"{len(targets)} regions), {n} chat calls over {args.duration:.0f} s of simulated time "
        f"at {args.time_scale:g}x, each contender on its own fresh simulator, side by side.",
        flush=True,
    )
    print(f"running {', '.join(gp.LABELS[c] for c in contenders)} ...", flush=True)
    started = time.monotonic()
    results: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}

    def run(c: str) -> None:
        results[c] = gp.run_contender(
            c, scenario_file, schedule, (args.duration, args.time_scale, ()), sim_bin, bench_bin, None, 60.0
        )

    threads = [threading.Thread(target=run, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows: list[dict[str, Any]] = []
    for c in contenders:
        result, stats = results[c]
        if "calls" in result:
            rows.append({"contender": c, "figures": gp.figures(result, stats, schedule["bound"])})
        else:
            rows.append({"contender": c, "error": result.get("error", "no result")})
    print(f"done in {time.monotonic() - started:.0f} s (times below are simulated seconds)\n")
    print(gp.table(args.scenario, rows, schedule["bound"], n))
    print()
    for r in rows:
        label = gp.LABELS[r["contender"]]
        if "figures" in r:
            print(f"- {label}: {explain(r['contender'], r['figures'], targets)}")
        else:
            print(f"- {label}: did not run ({r['error']})")
    print(
        f"- {gp.LABELS['bound']}: a client that knows the scenario in advance and sends each call once, "
        f"at the earliest instant some region admits it, each served in its median time."
    )
    ok = {r["contender"]: r["figures"] for r in rows if "figures" in r}
    if "sdk" in ok and "tower-py" in ok:
        sdk, ours = ok["sdk"], ok["tower-py"]
        print(
            f"\nSame SDK, one transport added: {ours['success_rate'] * 100:.1f} % of calls succeeded instead of "
            f"{sdk['success_rate'] * 100:.1f} %, with {ours['throttled_429']} 429s instead of {sdk['throttled_429']} "
            f"and p99 latency {gp.fmt(ours['latency_p99_s'], '.1f')} s instead of {gp.fmt(sdk['latency_p99_s'], '.1f')} s."
        )
    print("Full comparison with the peers: .venv/bin/python bench/goodput.py (see bench/README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
