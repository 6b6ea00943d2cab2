"""Issue 2's parity check: one throttled scenario through the Rust RetryLayer (over hyper) and
through the Python Transport (over httpx2, driven by the full engine on one backend) gives the
same hits, final status and waits. With hint_jitter=0 and only hinted failures, both sides' waits
are exactly the hints (the Rust layer's retry wait, the engine's cooldown)."""

from __future__ import annotations

import time

import httpx2
from conftest import Reply, ScriptedServer, chat_completion, throttle

import tower_aoai
from tower_aoai._core import _run_retry_layer

SETTINGS = dict(max_attempts=5, hint_jitter=0.0, backoff_base=0.2, backoff_cap=0.2, seed=5)
# Rust waits are measured (response received -> next attempt sent); Python's are the requested
# sleeps, counted from the response (the time the engine took to get to the next attempt is not
# slept again). Timer granularity and scheduling on a loaded machine stay well under this.
TOLERANCE = 0.05
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = b'{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}'


def through_python(server: ScriptedServer, script: list[Reply]) -> tuple[int, int, list[float], bytes, str | None]:
    server.play(*script)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    transport = tower_aoai.Transport(sleep=sleep, **SETTINGS)  # type: ignore[arg-type]
    with httpx2.Client(transport=transport) as client:
        response = client.post(server.url + PATH, content=BODY, headers={"content-type": "application/json"})
    return response.status_code, len(server.hits), waits, response.content, response.headers.get("x-should-retry")


def through_rust(server: ScriptedServer, script: list[Reply]) -> tuple[int, int, list[float], bytes, str | None]:
    server.play(*script)
    status, attempts, waits, body, should_retry = _run_retry_layer(
        tower_aoai.Engine(**SETTINGS),  # type: ignore[arg-type]
        server.url + PATH,
        body=BODY,
        headers=[("content-type", "application/json")],
    )
    assert attempts == len(server.hits)
    return status, attempts, waits, body, should_retry


def assert_same(python: tuple[int, int, list[float], bytes, str | None], rust: tuple[int, int, list[float], bytes, str | None]) -> None:
    py_status, py_hits, py_waits, py_body, py_flag = python
    rs_status, rs_hits, rs_waits, rs_body, rs_flag = rust
    assert (py_status, py_hits, py_body, py_flag) == (rs_status, rs_hits, rs_body, rs_flag)
    assert len(py_waits) == len(rs_waits) == py_hits - 1
    for py_wait, rs_wait in zip(py_waits, rs_waits):
        assert abs(rs_wait - py_wait) <= TOLERANCE, (py_waits, rs_waits)


def test_a_throttled_then_failing_then_successful_call_matches(server: ScriptedServer) -> None:
    script = [
        throttle(retry_after_ms="100"),
        Reply(503, {"retry-after-ms": "40"}, b'{"error":{"code":"503","message":"busy"}}'),
        throttle(message="The system is currently experiencing high demand.", retry_after="0.08"),
        throttle(retry_after_ms="60"),
        chat_completion("parity"),
    ]
    python = through_python(server, script)
    rust = through_rust(server, script)
    assert python[0] == 200 and python[1] == 5
    assert_same(python, rust)
    # Without jitter every wait is the hint, less the time from the response to the next decision.
    for wait, hint in zip(python[2], [0.1, 0.04, 0.08, 0.06]):
        assert hint - TOLERANCE <= wait <= hint, python[2]


def test_giving_up_matches(server: ScriptedServer) -> None:
    script = [throttle(retry_after_ms="150")]
    python = through_python(server, script)
    rust = through_rust(server, script)
    assert python[0] == 429 and python[1] == 5 and python[4] == "false"
    assert all(0.15 - TOLERANCE <= w <= 0.15 for w in python[2]), python[2]
    assert b"token rate limit" in python[3]
    assert_same(python, rust)


def test_blocked_matches(server: ScriptedServer) -> None:
    from conftest import blocked

    python = through_python(server, [blocked()])
    rust = through_rust(server, [blocked()])
    assert python[:2] == (403, 1)
    assert_same(python, rust)
