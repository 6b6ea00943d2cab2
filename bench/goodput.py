"""Goodput benchmark: the same workload, on a fresh simulator each time, through each contender.

For each scenario it reads the workload (``aoai-bench schedule``: arrivals, targets, request body,
and the lower bound the scenario's capacity allows), then for each contender starts
``aoai-sim serve --scenario FILE --time-scale K``, runs the calls with concurrent async callers
at their arrival times, reads the server's own counters (``GET /_sim/stats``) and stops it.

Contenders:
  sdk          openai SDK 3.x, AsyncAzureOpenAI, default retries (max_retries=2), first target
  priority-lb  openai SDK 2.x + openai-priority-loadbalancer 1.1.1 (bench/.venv-peers)
  litellm      LiteLLM Router over every target, num_retries=2 (bench/.venv-peers)
  tower-py     openai SDK 3.x over tower_aoai.AsyncTransport(backends=every target)
  tower-rust   tower-aoai's Rust Stack (one service over the engine) over hyper (aoai-bench goodput)

Times are virtual (the scenario's seconds): real seconds times the time scale. Client-side
backoffs that do not come from a server hint (the SDK's 0.5-8 s, LiteLLM's cooldowns, tower-aoai's
backoff) are real seconds and so count K times longer in virtual time; every contender has them.

    .venv/bin/python bench/goodput.py                      # every scenario and contender
    .venv/bin/python bench/goodput.py --quick --scenarios seed-429-peak-low-traffic --contenders sdk,tower-py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, Server, binary, machine  # noqa: E402

BENCH = ROOT / "bench"
SCENARIOS_DIR = ROOT / "aoai-sim" / "scenarios"
PEERS_VENV = BENCH / ".venv-peers"
PEERS_REQUIREMENTS = ["openai>=1.40,<3", "openai-priority-loadbalancer==1.1.1", "litellm>=1.74,<1.80", "matplotlib"]


@dataclass(frozen=True)
class Setting:
    """How a scenario is run: how much of its workload and how fast."""

    duration_s: float
    time_scale: float
    quick_duration_s: float
    #: `resource/deployment` targets instead of the workload's, in order (the first is the one
    #: a single-endpoint client uses).
    targets: tuple[str, ...] = ()


#: Client-side clocks (slow start, cooldowns, backoff) run in real time, so a time scale K makes
#: them K times slower in virtual time (the simulator reports its rate limits per real minute, so
#: a pace learned from x-ratelimit headers is not slowed): scales stay low (1-2), and the
#: contenders run side by side (each on its own fresh simulator) to keep the wall time down.
SETTINGS: dict[str, Setting] = {
    # The first burst after idle (80 calls in 3 s); the block it trips lasts an hour, so every
    # later burst of the scenario would fail the same way for a client that tripped it.
    "seed-403-idle-burst": Setting(duration_s=100, time_scale=2, quick_duration_s=100),
    "seed-429-regional": Setting(duration_s=240, time_scale=2, quick_duration_s=120),
    "seed-429-peak-low-traffic": Setting(duration_s=160, time_scale=1, quick_duration_s=80),
    "regional-outage": Setting(duration_s=240, time_scale=2, quick_duration_s=120),
    # Client-side spillover: the provisioned deployment without server-side spillover first, the
    # standard deployment of the same resource as the fallback.
    "ptu-spillover": Setting(
        duration_s=240,
        time_scale=2,
        quick_duration_s=120,
        targets=("aoai-ptu/gpt-4o-ptu-alone", "aoai-ptu/gpt-4o-std"),
    ),
}

CONTENDERS = ["sdk", "priority-lb", "litellm", "tower-py", "tower-rust"]
LABELS = {
    "sdk": "openai SDK (max_retries=2)",
    "priority-lb": "SDK 2.x + priority-loadbalancer",
    "litellm": "LiteLLM Router",
    "tower-py": "tower-aoai Python transport",
    "tower-rust": "tower-aoai Rust stack",
    "bound": "oracle (capacity bound)",
}
PEERS = {"priority-lb", "litellm"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peers_python() -> tuple[Path | None, str]:
    """The peers' venv python, created on first use; (None, why) when it cannot be set up."""
    py = PEERS_VENV / "bin" / "python"
    marker = PEERS_VENV / ".installed"
    if py.is_file() and marker.is_file():
        return py, ""
    log(f"creating {PEERS_VENV} for the peers ({', '.join(PEERS_REQUIREMENTS)}) ...")
    try:
        if not py.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEERS_REQUIREMENTS],
            check=True,
            timeout=1500,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        return None, f"pip install failed: {(e.stderr or '').strip().splitlines()[-1:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot create the peers' venv: {e}"
    marker.write_text(" ".join(PEERS_REQUIREMENTS) + "\n")
    return py, ""


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as r:
        stats: dict[str, Any] = json.loads(r.read())
    return stats


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * q))]


def figures(result: dict[str, Any], stats: dict[str, Any] | None, bound: dict[str, Any]) -> dict[str, Any]:
    calls = result.get("calls", [])
    n = len(calls)
    ok = [c for c in calls if c["ok"]]
    lat = [c["latency_s"] for c in ok]
    ttft = [c["ttft_s"] for c in ok if c["stream"] and c["ttft_s"] is not None]
    out: dict[str, Any] = {
        "calls": n,
        "successes": len(ok),
        "success_rate": len(ok) / n if n else 0.0,
        "makespan_s": result.get("makespan_s"),
        "makespan_ratio": (result["makespan_s"] / bound["makespan_s"])
        if result.get("makespan_s") and bound["makespan_s"]
        else None,
        "latency_p50_s": percentile(lat, 0.5),
        "latency_p99_s": percentile(lat, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
    }
    errors: dict[str, int] = {}
    for c in calls:
        if not c["ok"]:
            key = (c.get("error") or f"status {c['status']}").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out["failures"] = errors
    if stats is not None:
        by_status: dict[str, int] = {}
        for statuses in stats.get("by_deployment", {}).values():
            for s, k in statuses.items():
                by_status[s] = by_status.get(s, 0) + k
        hits = int(stats.get("requests", 0))
        per100 = 100.0 / len(ok) if ok else None
        out.update(
            {
                "server_requests": hits,
                "server_by_status": by_status,
                "server_by_deployment": {
                    d: sum(int(k) for k in statuses.values()) for d, statuses in stats.get("by_deployment", {}).items()
                },
                "throttled_429": by_status.get("429", 0),
                "blocked_403": by_status.get("403", 0),
                "per100_429": by_status.get("429", 0) * per100 if per100 else None,
                "per100_403": by_status.get("403", 0) * per100 if per100 else None,
                "extra_requests": hits - n,
                "extra_per_call": (hits - n) / n if n else None,
            }
        )
    return out


def run_contender(
    contender: str,
    scenario_file: Path,
    schedule: dict[str, Any],
    setting: tuple[float, float, tuple[str, ...]],
    sim_bin: Path,
    bench_bin: Path,
    peers_py: Path | None,
    call_timeout: float,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    duration, scale, targets = setting
    argv = [str(sim_bin), "serve", "--scenario", str(scenario_file), "--port", "0", "--time-scale", str(scale)]
    last_arrival = schedule["arrivals"][-1]["at"] if schedule["arrivals"] else 0.0
    # The whole run is bounded: arrivals, then the longest a call may take, then a margin.
    run_timeout = last_arrival / scale + call_timeout + 120
    with Server(argv) as server:
        if contender == "tower-rust":
            cmd = [
                str(bench_bin),
                "goodput",
                "--scenario",
                str(scenario_file),
                "--server",
                server.url,
                "--time-scale",
                str(scale),
                "--duration",
                str(duration),
                *(["--targets", ",".join(targets)] if targets else []),
                "--call-timeout",
                str(call_timeout),
            ]
        else:
            spec = {
                "schedule": schedule,
                "server": server.url,
                "resources": server.resources,
                "time_scale": scale,
                "call_timeout": call_timeout,
                "seed": 1,
            }
            fd, spec_path = tempfile.mkstemp(prefix="goodput-spec-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(spec, f)
            py = str(peers_py) if contender in PEERS and peers_py else sys.executable
            cmd = [py, str(BENCH / "contenders.py"), "--contender", contender, "--spec", spec_path]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=run_timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {run_timeout:.0f} s"}, None
        finally:
            if contender != "tower-rust":
                os.unlink(spec_path)
        wall = time.monotonic() - started
        stats = None
        try:
            stats = sim_stats(server.url)
        except OSError as e:
            log(f"  cannot read the simulator's stats: {e}")
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}, stats
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"unreadable output: {proc.stdout[-300:]!r}"}, stats
    result["wall_s"] = wall
    return result, stats


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(scenario: str, rows: list[dict[str, Any]], bound: dict[str, Any], calls: int) -> str:
    head = (
        f"{'contender':<33} {'success':>8} {'makespan':>9} {'x bound':>7} {'429/100':>8} {'403/100':>8} "
        f"{'p50 s':>7} {'p99 s':>7} {'TTFT p50':>9} {'extra/call':>10}"
    )
    lines = [f"## {scenario} ({calls} calls)", head]
    for r in rows:
        f = r.get("figures")
        if not f:
            lines.append(f"{LABELS.get(r['contender'], r['contender']):<33} not run: {r.get('error', '?')}")
            continue
        lines.append(
            f"{LABELS.get(r['contender'], r['contender']):<33} {f['success_rate'] * 100:>7.1f}% "
            f"{fmt(f['makespan_s'], '.0f', ' s'):>9} {fmt(f['makespan_ratio'], '.2f'):>7} "
            f"{fmt(f.get('per100_429'), '.1f'):>8} {fmt(f.get('per100_403'), '.1f'):>8} "
            f"{fmt(f['latency_p50_s'], '.2f'):>7} {fmt(f['latency_p99_s'], '.2f'):>7} "
            f"{fmt(f['ttft_p50_s'], '.2f'):>9} {fmt(f.get('extra_per_call'), '.2f'):>10}"
        )
    oracle = bound.get("oracle") or {}
    p50 = oracle.get("latency_p50_s", bound["service_s"])
    p99 = oracle.get("latency_p99_s")
    lines.append(
        f"{LABELS['bound']:<33} {100.0:>7.1f}% {bound['makespan_s']:>7.0f} s {1.0:>7.2f} {0.0:>8.1f} {0.0:>8.1f} "
        f"{p50:>7.2f} {fmt(p99, '.2f'):>7} {'':>9} {0.0:>10.2f}   ({bound['limited_by']})"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SETTINGS), help="comma-separated scenario names")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated contenders")
    ap.add_argument("--quick", action="store_true", help="half the workload of each scenario")
    ap.add_argument("--duration", type=float, help="virtual seconds of arrivals (overrides the setting)")
    ap.add_argument("--time-scale", type=float, help="simulator time scale (overrides the setting)")
    ap.add_argument("--call-timeout", type=float, default=120.0, help="real seconds one call may take")
    ap.add_argument("--out", type=Path, default=RESULTS / "goodput.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "goodput.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--merge", action="store_true", help="keep the other scenarios already in --out (rerun some)"
    )
    ap.add_argument(
        "--in-turn", dest="parallel", action="store_false", help="run contenders one after the other"
    )
    args = ap.parse_args()

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for s in scenarios:
        if not (SCENARIOS_DIR / f"{s}.toml").is_file():
            ap.error(f"no scenario {s!r} in {SCENARIOS_DIR}")
    for c in contenders:
        if c not in CONTENDERS:
            ap.error(f"unknown contender {c!r} (known: {', '.join(CONTENDERS)})")
    if not (0 < args.call_timeout <= 3600):
        ap.error("--call-timeout must be in (0, 3600]")

    sim_bin = binary("aoai-sim", "aoai-sim", "AOAI_SIM_BIN")
    bench_bin = binary("aoai-bench", "aoai-bench", "AOAI_BENCH_BIN")
    peers_py: Path | None = None
    peers_why = ""
    if PEERS & set(contenders):
        peers_py, peers_why = peers_python()
        if peers_py is None:
            log(f"peers unavailable: {peers_why}")

    out: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scenarios": {},
    }
    tables = []
    for name in scenarios:
        scenario_file = SCENARIOS_DIR / f"{name}.toml"
        st = SETTINGS.get(name, Setting(300, 10, 150))
        duration = args.duration or (st.quick_duration_s if args.quick else st.duration_s)
        scale = args.time_scale or st.time_scale
        schedule = json.loads(
            subprocess.run(
                [
                    str(bench_bin),
                    "schedule",
                    "--scenario",
                    str(scenario_file),
                    "--duration",
                    str(duration),
                    *(["--targets", ",".join(st.targets)] if st.targets else []),
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        bound = schedule["bound"]
        ncalls = len(schedule["arrivals"])
        log(f"{name}: {ncalls} calls over {duration:.0f} virtual s at time scale {scale:g}")
        runnable = [c for c in contenders if not (c in PEERS and peers_py is None)]
        log(f"  running {', '.join(runnable)} {'side by side' if args.parallel else 'in turn'} ...")
        results: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}

        def one(c: str) -> None:
            results[c] = run_contender(
                c, scenario_file, schedule, (duration, scale, st.targets), sim_bin, bench_bin, peers_py, args.call_timeout
            )

        if args.parallel:
            threads = [threading.Thread(target=one, args=(c,)) for c in runnable]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        else:
            for c in runnable:
                one(c)
        rows = []
        for c in contenders:
            if c not in results:
                rows.append({"contender": c, "error": f"peers' venv unavailable ({peers_why})"})
                continue
            result, stats = results[c]
            row: dict[str, Any] = {"contender": c}
            if "calls" in result:
                row["figures"] = figures(result, stats, bound)
                row["info"] = result.get("info")
                row["wall_s"] = result.get("wall_s")
                f = row["figures"]
                log(
                    f"    {c}: success {f['success_rate'] * 100:.1f} %, makespan {fmt(f['makespan_s'], '.0f')} s, "
                    f"server hits {f.get('server_requests')}, failures {f['failures']}"
                )
            else:
                row["error"] = result.get("error", "no result")
                row["server_stats"] = stats
                log(f"    {c} failed: {row['error']}")
            rows.append(row)
        out["scenarios"][name] = {
            "file": str(scenario_file.relative_to(ROOT)),
            "duration_s": duration,
            "time_scale": scale,
            "calls": ncalls,
            "streaming_calls": sum(1 for a in schedule["arrivals"] if a["stream"]),
            "targets": [t["name"] for t in schedule["targets"]],
            "bound": bound,
            "rows": rows,
        }
        text = table(name, rows, bound, ncalls)
        tables.append(text)
        print(text, end="\n\n", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        old["scenarios"].update(out["scenarios"])
        old.setdefault("reruns", []).append({"command": out["command"], "started": out["started"]})
        out = old
        tables = [table(n, sc["rows"], sc["bound"], sc["calls"]) for n, sc in out["scenarios"].items()]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    settings = "\n".join(
        f"- {n}: {sc['calls']} calls ({sc['streaming_calls']} streaming) over the first {sc['duration_s']:g} "
        f"simulated s, time scale {sc['time_scale']:g}, targets {', '.join(sc['targets'])}"
        for n, sc in out["scenarios"].items()
    )
    (args.out.with_suffix(".md")).write_text(
        f"Machine: {out['machine']}\n\nCommand: `{out['command']}` ({out['started']})"
        + "".join(f"; rerun `{r['command']}` ({r['started']})" for r in out.get("reruns", []))
        + f"\n\n{settings}\n\n```\n"
        + "\n\n".join(tables)
        + "\n```\n"
    )
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if not args.no_plot:
        plot_py = peers_py or (PEERS_VENV / "bin" / "python")
        try:
            subprocess.run(
                [str(plot_py), str(BENCH / "plot.py"), str(args.out), str(args.plot)],
                check=True,
                timeout=300,
            )
            log(f"wrote {args.plot}")
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log(f"no plot (matplotlib lives in {PEERS_VENV}): {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
