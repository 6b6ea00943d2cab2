"""tower_aoai.Transport over several backends (sync): failover, tiers, 403 isolation, the limiter,
pacing, statistics, diagnosis and secrets, through the real openai SDK against local servers on
different loopback hosts (each host is one Azure resource to the router)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx2
import openai
import pytest
from conftest import (
    QUOTA_MESSAGE,
    FakeSleep,
    Reply,
    ScriptedServer,
    blocked,
    chat_completion,
    server_error,
    throttle,
)
from openai.types.chat import ChatCompletionMessageParam

import tower_aoai

SDK_KEY = "sdk-key-that-must-be-replaced"
EAST_KEY = "east-secret-key-0123456789"
WEST_KEY = "west-secret-key-9876543210"
TOKEN = "bearer-secret-token-abcdef"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
HIGH_DEMAND = (
    "The system is currently experiencing high demand and cannot process your request. Your request exceeds "
    "the maximum usage size allowed during peak load. Please retry after 20 seconds."
)


def two(east: ScriptedServer, west: ScriptedServer, *, east_tier: int = 0, west_tier: int = 1) -> list[tower_aoai.Backend]:
    return [
        tower_aoai.Backend("east", east.url, deployment="gpt-4o-east", region="eastus2", api_key=EAST_KEY, tier=east_tier),
        tower_aoai.Backend("west", west.url, deployment="gpt-4o-west", region="swedencentral", api_key=WEST_KEY, tier=west_tier),
    ]


def azure(transport: tower_aoai.Transport) -> openai.AzureOpenAI:
    # The SDK's endpoint and key are placeholders: the transport sends to its backends.
    return openai.AzureOpenAI(
        azure_endpoint="https://sdk.example",
        api_key=SDK_KEY,
        api_version="2024-10-21",
        http_client=httpx2.Client(transport=transport),
    )


def chat(client: openai.AzureOpenAI) -> str | None:
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


def ours(exc: BaseException) -> BaseException | None:
    """Our error: the exception itself (openai >= 3) or its `__cause__` (openai < 3 wraps it)."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, tower_aoai.TowerAoaiError):
        seen = seen.__cause__
    return seen


def test_a_429_fails_over_at_once(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    east.play(throttle(retry_after_ms="5000"))
    with azure(tower_aoai.Transport(backends=two(east, west), sleep=sleep)) as client:
        assert chat(client) == "from west"
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert sleep.waits == []
    # Rewritten for each backend: its host, its deployment, its own key only.
    assert east.hits[0].path.startswith("/openai/deployments/gpt-4o-east/chat/completions?api-version=")
    assert west.hits[0].path.startswith("/openai/deployments/gpt-4o-west/chat/completions?api-version=")
    assert east.hits[0].headers["api-key"] == EAST_KEY
    assert west.hits[0].headers["api-key"] == WEST_KEY
    assert east.hits[0].body == west.hits[0].body


def test_the_lower_tier_is_used_first(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    # West is listed first but east is tier 0 (provisioned): every call goes to east.
    backends = list(reversed(two(east, west)))
    with azure(tower_aoai.Transport(backends=backends, sleep=sleep)) as client:
        for _ in range(4):
            assert chat(client) == "from east"
    assert (len(east.hits), len(west.hits)) == (4, 0)
    # A cooling tier 0 spills over to tier 1, then comes back once its cooldown passed.
    east.play(throttle(retry_after_ms="1000"), chat_completion("from east"))
    west.play(chat_completion("from west"))
    with azure(tower_aoai.Transport(backends=backends, sleep=sleep)) as client:
        assert chat(client) == "from west"
        assert chat(client) == "from west"  # east still cooling down
    assert len(east.hits) == 1
    assert sleep.waits == []


def test_a_403_isolates_its_resource(
    east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    east.play(blocked(apim_request_id="f6501a03-east", x_ms_region="East US 2"))
    transport = tower_aoai.Transport(backends=two(east, west), sleep=sleep)
    with caplog.at_level(logging.DEBUG, logger="tower_aoai"), azure(transport) as client:
        for _ in range(3):
            assert chat(client) == "from west"
    assert len(east.hits) == 1  # later calls never reach the blocked resource
    assert len(west.hits) == 3
    assert sleep.waits == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "temporarily blocked" in warnings[0] and "f6501a03-east" in warnings[0] and "East US 2" in warnings[0]
    stats = transport.stats()
    assert stats["backends"]["east"]["blocked"] == 1
    assert stats["backends"]["east"]["gauges"]["breaker"] == "blocked"
    assert stats["blocks"][0]["apim_request_id"] == "f6501a03-east"

    # Now west is blocked too: its 403 is returned, then no resource can serve.
    west.play(blocked(apim_request_id="77aa-west"))
    with azure(transport) as client:
        with pytest.raises(openai.PermissionDeniedError):
            chat(client)
        with pytest.raises(tower_aoai.BlockedError) as raised:
            chat(client)
    assert len(east.hits) == 1 and len(west.hits) == 1
    error = ours(raised.value)
    assert isinstance(error, tower_aoai.BlockedError)
    assert error.record["apim_request_id"] == "77aa-west"
    assert error.record["backend"] == "west"
    assert "77aa-west" in error.support_request and "127.0.0.3" in error.support_request
    kinds = transport.diagnose().kinds
    assert kinds.count("blocked") == 2


def test_backend_configuration_errors_name_the_argument() -> None:
    good = tower_aoai.Backend("a", "https://a.example")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backends": []}, "`backends`"),
        ({"backends": [good, tower_aoai.Backend("b", "ftp://b.example")]}, "`backends[1].endpoint`"),
        ({"backends": [good, tower_aoai.Backend("a", "https://c.example")]}, "`backends[1].name`"),
        ({"backends": [good, tower_aoai.Backend("b", "https://b.example", weight=0)]}, "`backends[1].weight`"),
        ({"backends": [tower_aoai.Backend("a", "https://a.example", rpm=-5.0)]}, "`backends[0].rpm`"),
        ({"backends": [tower_aoai.Backend("a", "https://a.example", deployment="a/b")]}, "`backends[0].deployment`"),
        ({"max_concurrency": 0}, "`max_concurrency`"),
        ({"min_concurrency": 0}, "`min_concurrency`"),
        ({"initial_concurrency": 9, "max_concurrency": 4}, "`initial_concurrency`"),
        ({"rpm": 0.0}, "`rpm`"),
        ({"tpm": -1.0}, "`tpm`"),
        ({"queue_timeout": 0.0}, "`queue_timeout`"),
        ({"chars_per_token": 0.0}, "`chars_per_token`"),
    ]
    for settings, name in cases:
        with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
            tower_aoai.Transport(**settings)
    with pytest.raises(ValueError, match="`token_provider`"):
        tower_aoai.Backend("a", "https://a.example", api_key="k", token_provider=lambda: "t")
    with pytest.raises(TypeError, match="`token_provider`"):
        tower_aoai.Backend("a", "https://a.example", token_provider="not callable")  # type: ignore[arg-type]


def test_a_token_provider_is_asked_every_attempt(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    tokens = iter([TOKEN + "-1", TOKEN + "-2"])
    backends = [
        tower_aoai.Backend("east", east.url, token_provider=lambda: next(tokens), tier=0),
        tower_aoai.Backend("west", west.url, token_provider=lambda: next(tokens)),
    ]
    east.play(server_error())
    with azure(tower_aoai.Transport(backends=backends, sleep=sleep)) as client:
        assert chat(client) == "from west"
    assert east.hits[0].headers["authorization"] == f"Bearer {TOKEN}-1"
    assert west.hits[0].headers["authorization"] == f"Bearer {TOKEN}-2"
    assert "api-key" not in east.hits[0].headers  # the SDK's key was removed

    def broken() -> str:
        raise RuntimeError("token service down")

    failing = [tower_aoai.Backend("east", east.url, token_provider=broken)]
    east.play(chat_completion())
    transport = tower_aoai.Transport(backends=failing, sleep=sleep)
    with azure(transport) as client, pytest.raises(RuntimeError, match="token service down"):
        chat(client)
    assert east.hits == []
    assert transport.stats()["backends"]["east"]["gauges"]["in_flight"] == 0


def test_no_secret_in_repr_logs_stats_or_diagnosis(
    east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    backends = [
        tower_aoai.Backend("east", east.url, region="eastus2", api_key=EAST_KEY, tier=0),
        tower_aoai.Backend("west", west.url, token_provider=lambda: TOKEN),
    ]
    east.play(throttle(retry_after_ms="1"), blocked(apim_request_id="r1"))
    transport = tower_aoai.Transport(backends=backends, sleep=sleep, max_attempts=3)
    with caplog.at_level(logging.DEBUG), azure(transport) as client:
        chat(client)
        chat(client)
        chat(client)
    shown = [
        repr(backends[0]),
        repr(backends[1]),
        repr(transport),
        repr(transport.engine),
        str(transport.stats()),
        transport.diagnose().text,
        str(transport.diagnose().to_dict()),
        *(r.getMessage() for r in caplog.records),
    ]
    assert any("<redacted>" in s for s in shown)
    for secret in (EAST_KEY, TOKEN, SDK_KEY):
        assert not any(secret in s for s in shown), secret


def test_calls_queue_at_the_concurrency_limit(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(Reply(200, body=b"slow", delay=0.1))
    transport = tower_aoai.Transport(max_concurrency=1, sleep=sleep)
    results: list[str] = []
    with httpx2.Client(transport=transport) as client:

        def call() -> None:
            results.append(client.get(server.url + "/q").text)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == ["slow"] * 3
    assert server.max_in_flight == 1
    assert transport.stats()["backends"]["default"]["gauges"]["in_flight"] == 0


def test_a_full_queue_fails_as_overloaded(server: ScriptedServer, sleep: FakeSleep) -> None:
    engine = tower_aoai.Engine(max_concurrency=1, queue_timeout=0.05)
    held = engine.start().next()[1]  # another request holds the only permit
    assert isinstance(held, tower_aoai.Attempt)
    with httpx2.Client(transport=tower_aoai.Transport(engine=engine, sleep=sleep)) as client:
        with pytest.raises(tower_aoai.OverloadedError):
            client.get(server.url + "/o")
    assert server.hits == []
    held.cancel()


def test_pacing_spaces_requests_at_the_known_rpm(server: ScriptedServer, sleep: FakeSleep) -> None:
    # 60 RPM, paced at 97 %: one request every 60 / (60 * 0.97) s, never a burst.
    interval = 60 / (60 * 0.97)
    with httpx2.Client(transport=tower_aoai.Transport(rpm=60, sleep=sleep)) as client:
        for _ in range(5):
            assert client.post(server.url + "/p", content=b"{}").status_code == 200
    assert len(server.hits) == 5
    assert len(sleep.waits) == 4
    # Each wait is what is left of the interval once the previous call's own time is counted.
    assert all(interval - 0.25 <= w <= interval + 1e-6 for w in sleep.waits), sleep.waits


def test_a_backends_own_quota_paces_only_it(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    backends = [
        tower_aoai.Backend("east", east.url, rpm=60, tier=0),
        tower_aoai.Backend("west", west.url, tier=1),
    ]
    with azure(tower_aoai.Transport(backends=backends, sleep=sleep)) as client:
        answers = [chat(client) for _ in range(3)]
    # East may take one request a second; the others spill over to west rather than wait.
    assert answers == ["from east", "from west", "from west"]
    assert sleep.waits == []


def test_counters_match_a_scripted_sequence(server: ScriptedServer, sleep: FakeSleep) -> None:
    ok = Reply(
        200,
        {"x-ratelimit-remaining-tokens": "9000", "x-ratelimit-limit-tokens": "10000", "x-ms-region": "East US 2"},
        b"{}",
    )
    server.play(
        throttle(retry_after_ms="10"),  # quota
        throttle(message=HIGH_DEMAND, retry_after_ms="10"),  # capacity
        server_error(),  # 5xx, backoff
        ok,
        Reply(400, {"content-type": "application/json"}, b'{"error":{"code":"BadRequest"}}'),
        blocked(apim_request_id="abc-123"),
    )
    transport = tower_aoai.Transport(sleep=sleep)
    with httpx2.Client(transport=transport) as client:
        assert client.post(server.url + "/c", content=b"{}").status_code == 200
        assert client.post(server.url + "/c", content=b"{}").status_code == 400
        assert client.post(server.url + "/c", content=b"{}").status_code == 403
        with pytest.raises(tower_aoai.BlockedError):
            client.post(server.url + "/c", content=b"{}")
    stats = transport.stats()
    assert list(stats["backends"]) == ["default"]
    b = stats["backends"]["default"]
    assert (b["requests"], b["successes"], b["retries"]) == (6, 1, 3)
    assert b["throttled"] == {"quota": 1, "capacity": 1, "provisioned": 0, "unknown": 0, "total": 2}
    assert (b["server_errors"], b["client_errors"], b["blocked"], b["connect_errors"], b["timeouts"]) == (1, 1, 1, 0, 0)
    assert b["headroom"]["remaining_tokens"] == 9000 and b["headroom"]["limit_tokens"] == 10000
    assert b["region"] == "East US 2"
    assert b["latency"]["count"] == 6 and b["latency"]["p50"] is not None
    assert b["latency"]["p50"] <= b["latency"]["p95"] <= b["latency"]["p99"]
    gauges = b["gauges"]
    assert gauges["in_flight"] == 0 and gauges["limit"] >= 1
    assert gauges["breaker"] == "blocked"
    assert gauges["breaker_until"] > b["last_throttle_at"] + 3000  # blocked for an hour
    assert [r["apim_request_id"] for r in stats["blocks"]] == ["abc-123"]
    # A passthrough engine has no endpoint of its own: the record names the request's host.
    assert stats["blocks"][0]["resource"] == server.url.removeprefix("http://")


def test_diagnose_names_capacity_in_one_region(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    east.play(throttle(message=HIGH_DEMAND, retry_after_ms="1"))
    transport = tower_aoai.Transport(backends=two(east, west), sleep=sleep)
    with azure(transport) as client:
        # East's 1 ms cooldown has passed by the next call: every call tries east first.
        for _ in range(4):
            assert chat(client) == "from west"
    assert len(east.hits) == 4
    diagnosis = transport.diagnose()
    found = {f["kind"]: f for f in diagnosis.to_dict()["findings"]}
    assert "capacity" in found
    assert found["capacity"]["backend"] == "east" and found["capacity"]["region"] == "eastus2"
    assert "quota" not in found
    assert "eastus2" in diagnosis.text and "high demand" in diagnosis.text


def test_diagnose_names_quota_for_token_rate_429s(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(
        throttle(QUOTA_MESSAGE, retry_after_ms="5"),
        chat_completion(),
        throttle(QUOTA_MESSAGE, retry_after_ms="5"),
        chat_completion(),
    )
    transport = tower_aoai.Transport(sleep=sleep)
    with httpx2.Client(transport=transport) as client:
        for _ in range(2):
            assert client.post(server.url + "/d", content=b"{}").status_code == 200
    diagnosis = transport.diagnose()
    assert diagnosis.kinds == ["quota"]
    finding = diagnosis.to_dict()["findings"][0]
    assert finding["evidence"]["429s by cause"] == "quota 2, capacity 0, provisioned 0, unknown 0"
    assert diagnosis.text.startswith("[quota]")


def test_legacy_httpx_transport_rewrites_for_its_backends(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    import httpx

    east.play(throttle(retry_after_ms="2000"))
    transport = tower_aoai.HttpxTransport(backends=two(east, west), sleep=sleep)
    with httpx.Client(transport=transport) as client:
        response = client.post(
            "https://sdk.example/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            json={"messages": []},
            headers={"api-key": SDK_KEY},
        )
    assert response.json()["choices"][0]["message"]["content"] == "from west"
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert west.hits[0].headers["api-key"] == WEST_KEY
    assert west.hits[0].headers["host"] == west.url.removeprefix("http://")
    assert sleep.waits == []


def test_settings_are_kept_and_shown() -> None:
    engine = tower_aoai.Engine(
        backends=[tower_aoai.Backend("a", "https://a.example", api_key=EAST_KEY, rpm=600.0, tier=0)],
        max_concurrency=8,
        rpm=1200.0,
        queue_timeout=5.0,
    )
    assert (engine.initial_concurrency, engine.min_concurrency, engine.max_concurrency) == (4, 1, 8)
    assert (engine.rpm, engine.tpm, engine.queue_timeout) == (1200.0, None, 5.0)
    assert not engine.passthrough and tower_aoai.Engine().passthrough
    (backend,) = engine.backends
    assert (backend.name, backend.tier, backend.weight, backend.rpm) == ("a", 0, 1, 600.0)
    shown = repr(engine)
    assert "backends=[\"a\"]" in shown and "max_concurrency=8" in shown and "rpm=1200.0" in shown
    assert repr(backend) == (
        "Backend(\"a\", \"https://a.example\", deployment=None, region=None, api_key=<redacted>, "
        "tier=0, weight=1, rpm=600.0, tpm=None)"
    )


def test_no_usable_backend_within_the_deadline_raises(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    east.play(throttle(retry_after="100"))
    west.play(throttle(retry_after="100"))
    transport = tower_aoai.Transport(backends=two(east, west), sleep=sleep, deadline=5.0)
    with azure(transport) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            chat(client)  # both throttled for longer than the deadline: the last 429, final
        assert limited.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(tower_aoai.NoBackendError):
            chat(client)  # both still cooling down past this call's deadline: nothing is sent
    assert (len(east.hits), len(west.hits)) == (1, 1)
    assert sleep.waits == []
    stats = transport.stats()["backends"]
    assert all(stats[name]["gauges"]["cooldown_until"] is not None for name in ("east", "west"))


def test_a_v1_body_gets_the_backends_deployment_as_model(east: ScriptedServer, west: ScriptedServer, sleep: FakeSleep) -> None:
    import json

    east.play(throttle(retry_after_ms="5000"))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with httpx2.Client(transport=tower_aoai.Transport(backends=two(east, west), sleep=sleep)) as client:
        response = client.post("https://sdk.example/openai/v1/chat/completions", content=body, headers={"api-key": SDK_KEY})
    assert response.status_code == 200
    sent = [json.loads(east.hits[0].body), json.loads(west.hits[0].body)]
    assert [s["model"] for s in sent] == ["gpt-4o-east", "gpt-4o-west"]
    assert all(s["messages"] == [{"role": "user", "content": "hi"}] for s in sent)
    assert west.hits[0].headers["content-length"] == str(len(west.hits[0].body))
    assert west.hits[0].path == "/openai/v1/chat/completions"
