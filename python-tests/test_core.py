"""The native engine (tower_aoai._core): validation, header handling and the action tuples."""

from __future__ import annotations

import logging
import math

import pytest

import tower_aoai
from tower_aoai import Engine


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", 101),
        ("max_attempts", -1),
        ("deadline", 0.0),
        ("deadline", -5.0),
        ("deadline", math.nan),
        ("max_wait", 0.0),
        ("max_wait", math.inf),
        ("backoff_base", 0.0),
        ("backoff_cap", 0.1),  # below the default base of 0.5
        ("hint_jitter", 1.5),
        ("hint_jitter", math.nan),
        ("budget_ttl", 0.5),
        ("budget_ttl", -1.0),
        ("budget_min_per_sec", -1),
        ("budget_ratio", -0.1),
        ("budget_ratio", math.inf),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(argument: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Engine(**{argument: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{argument}`"):
        tower_aoai.Transport(**{argument: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{argument}`"):
        tower_aoai.AsyncTransport(**{argument: value})  # type: ignore[arg-type]


def test_unknown_settings_and_mixed_engine_are_type_errors() -> None:
    with pytest.raises(TypeError):
        tower_aoai.Transport(max_attemps=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="engine"):
        tower_aoai.Transport(engine=Engine(), max_attempts=3)
    with pytest.raises(TypeError, match="engine"):
        tower_aoai.Transport(engine="not an engine")  # type: ignore[arg-type]


def test_settings_are_kept_and_shown() -> None:
    engine = Engine(max_attempts=7, deadline=None, max_wait=30.0, backoff_base=0.25, backoff_cap=4.0, seed=9)
    assert engine.max_attempts == 7
    assert engine.deadline is None
    assert engine.max_wait == 30.0
    assert engine.backoff_base == 0.25
    assert engine.backoff_cap == 4.0
    assert engine.seed == 9
    assert repr(engine).startswith("Engine(max_attempts=7, deadline=None, max_wait=30.0,")
    defaults = Engine()
    assert (defaults.max_attempts, defaults.deadline, defaults.max_wait) == (5, 120.0, 60.0)
    assert (defaults.budget_ttl, defaults.budget_min_per_sec, defaults.budget_ratio) == (10.0, 10, 0.2)


def send(call: tower_aoai.Call) -> tower_aoai.Attempt:
    step, attempt = call.next()
    assert step == "send", (step, attempt)
    assert isinstance(attempt, tower_aoai.Attempt)
    return attempt


def test_needs_body_only_for_error_statuses() -> None:
    call = Engine().start()
    assert not call.needs_body(200)
    assert not call.needs_body(304)
    assert call.needs_body(429)
    assert call.needs_body(500)
    assert not call.needs_body(1000)


def test_decisions() -> None:
    call = Engine(max_attempts=2, hint_jitter=0.0).start()
    attempt = send(call)
    assert attempt.backend == "default" and not attempt.rewrites
    assert attempt.on_response(429, [(b"retry-after-ms", b"1500")], b"{}") == ("retry", "throttled_unknown", None)
    assert not attempt.open
    step, wait = call.next()
    assert step == "wait" and isinstance(wait, float) and 1.49 <= wait <= 1.5
    # The wait was carried out (a fake sleep): the engine's clock moved on, the backend is back.
    attempt = send(call)
    assert attempt.on_response(429, [(b"retry-after-ms", b"1500")], b"{}") == (
        "give_up",
        "throttled_unknown",
        "attempts_exhausted",
    )
    assert call.attempts == 2
    assert call.last_outcome == "throttled_unknown"
    assert send(Engine().start()).on_response(200, []) == ("return", "success", None)
    assert send(Engine().start()).on_response(400, [], b'{"error":{"code":"BadRequest"}}')[0] == "return"
    with pytest.raises(RuntimeError, match="already"):
        attempt.on_response(200, [])


def test_the_body_decides_the_throttle_cause() -> None:
    body = b'{"error":{"code":"429","message":"The system is currently experiencing high demand"}}'
    assert send(Engine().start()).on_response(429, [], body)[1] == "throttled_capacity"


def test_x_should_retry_false_from_the_server_is_honoured() -> None:
    assert send(Engine().start()).on_response(503, [(b"x-should-retry", b"false")], b"")[0] == "return"


def test_on_error() -> None:
    call = Engine(max_attempts=3, backoff_base=0.1, backoff_cap=0.1).start()
    assert send(call).on_error("timeout") == ("retry", "transient_timeout", None)
    step, value = call.next()
    if step == "wait":  # full jitter may draw zero: then it sends at once
        assert isinstance(value, float) and 0.0 <= value <= 0.1
        step, value = call.next()
    assert step == "send" and isinstance(value, tower_aoai.Attempt)
    assert value.on_error("connect")[0] == "retry"
    step, value = call.next()
    if step == "wait":
        step, value = call.next()
    assert isinstance(value, tower_aoai.Attempt)
    with pytest.raises(ValueError, match="`kind`"):
        value.on_error("dns")  # type: ignore[arg-type]
    assert value.open  # a rejected argument does not use up the attempt
    assert value.on_error("connect") == ("give_up", "transient_connect", "attempts_exhausted")


def test_hostile_headers_are_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    headers = [
        (b"bad name", b"1"),
        (b"retry-after", b"\x00\x01"),
        (b"x-junk", b"\xff\xfe"),
        (b"retry-after-ms", b"99999999999999999999999999"),
        (b"retry-after", b"3"),
    ]
    call = Engine(hint_jitter=0.0).start()
    with caplog.at_level(logging.DEBUG, logger="tower_aoai"):
        assert send(call).on_response(429, headers, b"\xff not json")[0] == "retry"
    step, wait = call.next()
    # The overflowing retry-after-ms is no hint; the valid retry-after is.
    assert step == "wait" and isinstance(wait, float) and 2.99 <= wait <= 3.0
    assert any("invalid header" in r.getMessage() for r in caplog.records)


def test_only_a_403_hands_over_every_header() -> None:
    """The engine converts only the headers it reads (plus every header of a 403, whose support
    record keeps them): unread ones, even invalid, cost nothing and log nothing; read ones count;
    every item is still checked for its type."""
    engine = Engine(backends=[tower_aoai.Backend("east", "https://east.example", api_key="k")])
    noise = [(b"x-ms-client-request-id", b"c-1"), (b"x-junk", b"\xff\xfe"), (b"bad name", b"1")]
    triples = [(b"X-RateLimit-Remaining-Requests", b"x-ratelimit-remaining-requests", b"41"), *((n, n, v) for n, v in noise)]
    for headers in (triples, [(t[0], t[2]) for t in triples]):
        after, lease = send(engine.start()).on_response_streamed(200, headers)
        assert after[0] == "return" and lease is not None
        lease.finish()
        assert engine.stats()["backends"]["east"]["headroom"]["remaining_requests"] == 41
    with pytest.raises(TypeError):
        send(engine.start()).on_response(200, [(b"x-unread", "not bytes")])  # type: ignore[list-item]
    blocked = b'{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked."}}'
    assert send(engine.start()).on_response(403, [(b"apim-request-id", b"a-1"), *noise[:1]], blocked)[1] == "blocked"
    record = engine.stats()["blocks"][0]
    assert record["apim_request_id"] == "a-1"
    assert dict(record["headers"])["x-ms-client-request-id"] == "c-1"


def test_headers_must_be_byte_pairs() -> None:
    attempt = send(Engine().start())
    with pytest.raises(TypeError):
        attempt.on_response(429, [("retry-after", "1")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`status`"):
        attempt.on_response(42, [])
    assert attempt.open


def test_the_budget_is_shared_by_calls_of_one_engine() -> None:
    engine = Engine(budget_min_per_sec=1, budget_ttl=1.0, budget_ratio=0.0)
    assert engine.budget_remaining() == 1
    assert send(engine.start()).on_error("connect")[0] == "retry"
    assert send(engine.start()).on_error("connect") == ("give_up", "transient_connect", "budget_exhausted")


def test_a_dropped_attempt_returns_its_permit() -> None:
    engine = Engine(max_concurrency=1, queue_timeout=5.0)
    first = send(engine.start())
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 1
    blocked = engine.start()
    assert blocked.next()[0] == "queue"
    del first  # no outcome: the permit goes back (RAII)
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 0
    second = send(blocked)
    second.cancel()
    second.cancel()  # idempotent
    assert not second.open
    assert engine.stats()["backends"]["default"]["gauges"]["in_flight"] == 0


def test_legacy_names_are_lazy_and_listed() -> None:
    assert "HttpxTransport" in dir(tower_aoai)
    with pytest.raises(AttributeError):
        tower_aoai.NoSuchThing  # noqa: B018


def test_importing_needs_no_legacy_httpx() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tower_aoai\n"
        "assert 'httpx' not in sys.modules, 'legacy httpx was imported eagerly'\n"
        "sys.modules['httpx'] = None\n"
        "tower_aoai.Transport()\n"
        "try:\n"
        "    tower_aoai.HttpxTransport\n"
        "except ImportError as e:\n"
        "    assert 'tower-aoai[legacy]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_rewrite_plan_replaces_every_caller_secret_and_keeps_the_other_headers() -> None:
    """The transports apply the core's rewrite plan to httpx's headers (its triples, or raw pairs
    for an httpx without them) as `Backends::rewritten` does in Rust: every auth header the caller
    sent is dropped, the backend's own is added, `host` and (for a new body) `content-length` are
    replaced in place with one value each (a second `host` goes), the rest stay in order."""
    import httpx2

    from tower_aoai import _core
    from tower_aoai._driver import _items, _rewritten_headers

    engine = Engine(backends=[tower_aoai.Backend("east", "https://east.example:8443", deployment="d1", api_key="EAST-KEY")])
    call = engine.start()
    step, attempt = call.next()
    assert step == "send" and isinstance(attempt, tower_aoai._core.Attempt)
    url, host, auth, body = attempt.plan(
        "https://sdk.example/openai/v1/chat/completions?x=1", b'{"model":"gpt-4o","messages":[]}'
    )
    assert url == "https://east.example:8443/openai/v1/chat/completions?x=1"
    assert host == b"east.example:8443"
    assert auth == (b"api-key", b"EAST-KEY")
    assert body is not None and b'"model":"d1"' in body
    assert set(_core.REWRITE_REMOVES) == {b"api-key", b"authorization", b"ocp-apim-subscription-key", b"x-api-key"}
    request = httpx2.Request(
        "POST",
        "https://sdk.example/openai/v1/chat/completions",
        headers=[
            ("Host", "sdk.example"),
            ("API-Key", "CALLER-KEY"),
            ("Authorization", "Bearer CALLER"),
            ("X-Keep", "1"),
            ("Ocp-Apim-Subscription-Key", "APIM"),
            ("X-Api-Key", "X"),
            ("Content-Length", "3"),
            ("X-Keep", "2"),
            ("Host", "second.example"),
        ],
        content=b"abc",
    )
    for triples in (True, False):
        edited = _rewritten_headers(_items(request.headers, triples), triples, host, auth, str(len(body)).encode())
        pairs = [(item[1] if triples else item[0].lower(), item[-1]) for item in edited]
        assert pairs == [
            (b"host", b"east.example:8443"),
            (b"x-keep", b"1"),
            (b"content-length", str(len(body)).encode()),
            (b"x-keep", b"2"),
            (b"api-key", b"EAST-KEY"),
        ], triples
    attempt.cancel()


def test_a_rewritten_request_matches_one_built_by_httpx() -> None:
    """`_rewrite` builds its copy without httpx's constructors (and hands the plan the path and
    query alone): the copy must be what `httpx2.Request` would build from the same parts, its
    headers as `httpx2.Headers` would hold them. An httpx whose empty `Headers` holds more than
    `_list` and `_encoding` gets its headers from the constructor."""
    import types

    import httpx2

    from tower_aoai._driver import _bare_headers, _header_triples, _rewrite

    engine = Engine(backends=[tower_aoai.Backend("east", "https://east.example:8443", deployment="d1", api_key="EAST-KEY")])
    request = httpx2.Client().build_request(
        "POST",
        "https://sdk.example/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=%C3%A9",
        content=b'{"messages":[]}',
        headers={"api-key": "CALLER-KEY", "x-keep": "1"},
        extensions={"timeout": {"read": 5.0}},
    )

    class Headers(httpx2.Headers):
        """An httpx whose headers keep one more attribute."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.extra = True

    other = types.ModuleType("other_httpx")
    vars(other).update({**vars(httpx2), "__name__": "other_httpx", "Headers": Headers})
    assert _bare_headers(httpx2) and not _bare_headers(other)
    for http in (httpx2, other):
        step, attempt = engine.start().next()
        assert step == "send"
        sent = _rewrite(http, {}, request, attempt, _header_triples(httpx2))  # type: ignore[arg-type]
        attempt.cancel()
        expected = httpx2.Request(
            "POST",
            "https://east.example:8443/openai/deployments/d1/chat/completions?api-version=2024-10-21&x=%C3%A9",
            headers=[(k, v) for k, v in request.headers.raw if k.lower() != b"api-key"] + [(b"api-key", b"EAST-KEY")],
            content=b'{"messages":[]}',
        )
        assert str(sent.url) == str(expected.url)
        assert type(sent.headers) is http.Headers
        assert sent.headers._list == [
            (b"Host" if k == b"host" else k, lower, b"east.example:8443" if lower == b"host" else v)
            for k, lower, v in expected.headers._list
        ]
        assert vars(sent.headers).keys() == vars(http.Headers()).keys()
        assert sent.headers["api-key"] == "EAST-KEY" and "CALLER-KEY" not in repr(vars(sent.headers))
        assert sent.content == request.content and sent.extensions == request.extensions
        assert sent.extensions is not request.extensions
        assert request.headers["api-key"] == "CALLER-KEY"  # the caller's request is untouched
