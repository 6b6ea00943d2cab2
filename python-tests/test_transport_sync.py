"""tower_aoai.Transport under the real openai SDK (sync), against the scripted local server."""

from __future__ import annotations

import logging
import socket

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam
import pytest
from conftest import (
    FakeSleep,
    Reply,
    ScriptedServer,
    blocked,
    chat_completion,
    http_date,
    server_error,
    sse_stream,
    throttle,
)

import tower_aoai

API_KEY = "sk-test-secret-do-not-log"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def azure(server: ScriptedServer, transport: tower_aoai.Transport) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=server.url,
        api_key=API_KEY,
        api_version="2024-10-21",
        http_client=httpx2.Client(transport=transport),
    )


def chat(client: openai.AzureOpenAI | openai.OpenAI) -> str | None:
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return completion.choices[0].message.content


@pytest.mark.parametrize(
    ("reply", "low", "high"),
    [
        (throttle(retry_after_ms="250"), 0.25, 0.275),
        (throttle(retry_after="2"), 2.0, 2.2),
        (throttle(retry_after="1.5"), 1.5, 1.65),
        (throttle(x_ratelimit_reset_tokens="6s"), 6.0, 6.6),
        (throttle(x_rate_limit_reset_tokens="3"), 3.0, 3.3),
        # retry-after-ms wins over retry-after
        (throttle(retry_after_ms="100", retry_after="9"), 0.1, 0.11),
    ],
    ids=["retry-after-ms", "retry-after", "retry-after-decimal", "reset-tokens", "hyphenated-reset", "ms-wins"],
)
def test_waits_the_servers_hint_then_succeeds(
    server: ScriptedServer, sleep: FakeSleep, reply: Reply, low: float, high: float
) -> None:
    server.play(reply, chat_completion("after the wait"))
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client:
        assert chat(client) == "after the wait"
    assert len(server.hits) == 2
    assert len(sleep.waits) == 1
    # The backend cools down from the response; the wait is asked a little later.
    assert low - 0.03 <= sleep.waits[0] <= high


def test_waits_until_an_http_date(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(throttle(retry_after=http_date(30)), chat_completion())
    with azure(server, tower_aoai.Transport(sleep=sleep, hint_jitter=0.0)) as client:
        chat(client)
    assert len(server.hits) == 2
    # HTTP dates have one-second resolution.
    assert 28.0 <= sleep.waits[0] <= 31.0


def test_a_429_without_a_hint_cools_down_for_the_default(server: ScriptedServer, sleep: FakeSleep) -> None:
    # No hint: the backend cools down for the router's default 10 s (jittered up to hint_jitter).
    server.play(throttle(message="Too many requests"), throttle(message="x"), chat_completion())
    with azure(server, tower_aoai.Transport(sleep=sleep, seed=7)) as client:
        chat(client)
    assert len(server.hits) == 3
    assert len(sleep.waits) == 2
    assert all(9.99 <= w <= 11.0 for w in sleep.waits), sleep.waits


def test_a_5xx_without_a_hint_backs_off_with_full_jitter(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(server_error(), server_error(), chat_completion())
    with azure(server, tower_aoai.Transport(sleep=sleep, backoff_base=0.5, backoff_cap=8.0, seed=7)) as client:
        chat(client)
    assert len(server.hits) == 3
    # Full jitter may draw no wait at all; a drawn wait is within the doubling bound.
    assert len(sleep.waits) <= 2
    assert all(0.0 <= w <= 1.0 for w in sleep.waits)


def test_the_same_seed_gives_the_same_waits(server: ScriptedServer) -> None:
    runs = []
    for _ in range(2):
        sleep = FakeSleep()
        server.play(throttle(message="x"), throttle(message="x"), server_error(), chat_completion())
        with azure(server, tower_aoai.Transport(sleep=sleep, seed=42)) as client:
            chat(client)
        runs.append(sleep.waits)
    assert len(runs[0]) >= 2
    # The same jitter draws; the waits differ only by the microseconds each run took.
    assert runs[0] == pytest.approx(runs[1], abs=0.005)


def test_gives_up_after_max_attempts_and_the_sdk_does_not_retry_again(
    server: ScriptedServer, sleep: FakeSleep
) -> None:
    server.play(throttle(retry_after_ms="1000"))
    with azure(server, tower_aoai.Transport(sleep=sleep, max_attempts=3)) as client:
        assert client.max_retries == 2  # the SDK's default is left on
        with pytest.raises(openai.RateLimitError) as raised:
            chat(client)
    assert len(server.hits) == 3
    assert len(sleep.waits) == 2
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.status_code == 429
    assert "token rate limit" in raised.value.message


def test_a_hint_longer_than_max_wait_gives_up_at_once(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(throttle(retry_after="86400"))
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client, pytest.raises(openai.RateLimitError):
        chat(client)
    assert len(server.hits) == 1
    assert sleep.waits == []


def test_blocked_is_returned_at_once(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(blocked())
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            chat(client)
    assert len(server.hits) == 1
    assert sleep.waits == []
    assert "temporarily blocked" in raised.value.message


def test_a_server_error_is_retried(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(server_error(), chat_completion("recovered"))
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client:
        assert chat(client) == "recovered"
    assert len(server.hits) == 2
    assert len(sleep.waits) <= 1  # a full-jitter backoff may draw (almost) nothing


def test_the_request_is_replayed_identically(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(throttle(retry_after_ms="5"), chat_completion())
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client:
        chat(client)
    first, second = server.hits
    assert first.body == second.body
    assert b'"messages"' in first.body
    assert first.path == second.path
    assert first.path.startswith("/openai/deployments/gpt-4o/chat/completions")


def test_streams_chunk_by_chunk_after_a_throttle(server: ScriptedServer, sleep: FakeSleep) -> None:
    import threading

    gate = threading.Event()
    server.play(throttle(retry_after_ms="200"), sse_stream(["Hel", "lo", "!"], gate=gate))
    with azure(server, tower_aoai.Transport(sleep=sleep)) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        words: list[str | None] = []
        for chunk in stream:
            if not words:
                # The first chunk reached us while the server still holds the rest back.
                assert not server.stream_finished.is_set()
                gate.set()
            if chunk.choices:
                words.append(chunk.choices[0].delta.content)
    assert words == ["Hel", "lo", "!"]
    assert len(server.hits) == 2


def test_openai_client_with_base_url(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(throttle(retry_after_ms="50"), chat_completion("from openai"))
    client = openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=API_KEY,
        http_client=httpx2.Client(transport=tower_aoai.Transport(sleep=sleep)),
    )
    with client:
        assert chat(client) == "from openai"
    assert [h.path for h in server.hits] == ["/v1/chat/completions"] * 2
    assert server.hits[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_a_large_error_body_is_returned_whole(server: ScriptedServer, sleep: FakeSleep) -> None:
    big = b'{"error":{"code":"500","message":"' + b"x" * 100_000 + b'"}}'
    server.play(server_error(big))
    with httpx2.Client(transport=tower_aoai.Transport(sleep=sleep, max_attempts=2)) as client:
        response = client.post(server.url + "/x", content=b"{}")
    assert response.status_code == 500
    assert response.headers["x-should-retry"] == "false"
    assert response.content == big
    assert len(server.hits) == 2


def test_a_success_body_is_streamed_not_read(server: ScriptedServer, sleep: FakeSleep) -> None:
    import threading

    gate = threading.Event()
    server.play(Reply(200, {"content-type": "text/plain"}, chunks=[b"first", b"second"], gate=gate))
    with httpx2.Client(transport=tower_aoai.Transport(sleep=sleep)) as client:
        with client.stream("GET", server.url + "/s") as response:
            parts = response.iter_raw()
            assert next(parts) == b"first"
            assert not server.stream_finished.is_set()
            gate.set()
            assert b"".join(parts) == b"second"


def test_connection_errors_are_retried_then_raised(sleep: FakeSleep) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` now.
    transport = tower_aoai.Transport(sleep=sleep, max_attempts=3, backoff_base=0.1, backoff_cap=0.2)
    with httpx2.Client(transport=transport) as client, pytest.raises(httpx2.ConnectError):
        client.get(f"http://127.0.0.1:{port}/")
    assert len(sleep.waits) <= 2  # a full-jitter backoff may draw (almost) nothing
    assert all(0.0 <= w <= 0.2 for w in sleep.waits)


def test_a_client_timeout_is_retried(server: ScriptedServer, sleep: FakeSleep) -> None:
    server.play(Reply(200, body=b"late", delay=0.5), Reply(200, body=b"on time"))
    with httpx2.Client(transport=tower_aoai.Transport(sleep=sleep), timeout=0.2) as client:
        response = client.get(server.url + "/t")
    assert response.text == "on time"
    assert len(server.hits) == 2
    assert len(sleep.waits) <= 1  # a full-jitter backoff may draw (almost) nothing


def test_no_secret_in_logs_or_repr(
    server: ScriptedServer, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    server.play(throttle(retry_after_ms="5"), throttle(retry_after_ms="5"))
    transport = tower_aoai.Transport(sleep=sleep, max_attempts=2)
    with caplog.at_level(logging.DEBUG, logger="tower_aoai"):
        with azure(server, transport) as client, pytest.raises(openai.RateLimitError):
            chat(client)
    messages = [r.getMessage() for r in caplog.records if r.name == "tower_aoai"]
    assert any("-> retry" in m and "backend default" in m for m in messages)
    assert any("giving up" in m and "attempts_exhausted" in m for m in messages)
    assert all(API_KEY not in m and "api-version" not in m for m in messages)
    assert API_KEY not in repr(transport)
    assert "max_attempts=2" in repr(transport)


def test_close_closes_the_inner_transport() -> None:
    closed = []

    class Inner(httpx2.BaseTransport):
        def close(self) -> None:
            closed.append(True)

    with tower_aoai.Transport(Inner()):
        pass
    assert closed == [True]


def test_an_inner_transport_is_wrapped(sleep: FakeSleep) -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx2.Response(503, headers={"retry-after-ms": "400"}, content=b"busy")
        return httpx2.Response(200, content=b"ok")

    transport = tower_aoai.Transport(httpx2.MockTransport(handler), sleep=sleep)
    with httpx2.Client(transport=transport) as client:
        assert client.post("http://backend.invalid/x", content=b"body").text == "ok"
    assert len(calls) == 2
    assert 0.395 <= sleep.waits[0] <= 0.44


def test_legacy_httpx_transport(server: ScriptedServer, sleep: FakeSleep) -> None:
    import httpx

    server.play(throttle(retry_after_ms="300"), chat_completion("legacy"))
    with httpx.Client(transport=tower_aoai.HttpxTransport(sleep=sleep)) as client:
        response = client.post(server.url + "/openai/deployments/d/chat/completions", json={"messages": []})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "legacy"
    assert len(server.hits) == 2
    assert 0.295 <= sleep.waits[0] <= 0.33
    assert isinstance(tower_aoai.HttpxTransport(), httpx.BaseTransport)


def test_a_gzip_error_body_is_inflated_to_classify_it(
    server: ScriptedServer, sleep: FakeSleep, caplog: pytest.LogCaptureFixture
) -> None:
    import gzip

    message = b'{"error":{"code":"429","message":"The system is currently experiencing high demand."}}'
    server.play(
        Reply(429, {"content-encoding": "gzip", "retry-after-ms": "5"}, gzip.compress(message)),
        chat_completion(),
    )
    with caplog.at_level(logging.DEBUG, logger="tower_aoai"):
        with httpx2.Client(transport=tower_aoai.Transport(sleep=sleep)) as client:
            assert client.post(server.url + "/g", content=b"{}").status_code == 200
    assert any("throttled_capacity" in r.getMessage() for r in caplog.records)
