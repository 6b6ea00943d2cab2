"""Native part of tower_aoai: a sans-IO surface over the Rust policy engine."""

from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, final

__all__ = [
    "Attempt",
    "Backend",
    "Call",
    "Diagnosis",
    "Engine",
    "Failure",
    "Lease",
    "_run_retry_layer",
    "MAX_ERROR_BODY",
    "REWRITE_REMOVES",
    "__version__",
]
__version__: Final[str]
#: How many bytes of an error body are read to classify it.
MAX_ERROR_BODY: Final[int]
#: The auth headers (lower-case names) a request loses before its backend's own is set.
REWRITE_REMOVES: Final[tuple[bytes, ...]]

#: ``(action, outcome, reason)``: action ``"return"``, ``"retry"`` or ``"give_up"``; the attempt's
#: outcome (``"success"``, ``"throttled_quota"``, ``"blocked"``, ...); the give-up reason.
_After = tuple[Literal["return", "retry", "give_up"], str, str | None]
#: Raw headers: ``(name, value)`` pairs, or httpx's own ``(name, lower-case name, value)`` triples.
_Headers = Iterable[tuple[bytes, bytes] | tuple[bytes, bytes, bytes]]
_Next = (
    tuple[Literal["send"], Attempt]
    | tuple[Literal["wait", "queue"], float]
    | tuple[Literal["fail"], Failure]
)

@final
class Backend:
    """One deployment a transport may send to. ``repr()`` never shows the key or token.

    A request is rewritten for it: scheme, host and port, the endpoint's base path, the
    ``/openai/deployments/{deployment}/`` segment, the ``model`` of a v1/responses body, and the
    auth header: every auth header the request came with (the SDK's key) is removed and the
    backend's own ``api_key`` (``api-key``) or ``token_provider()`` (``authorization: Bearer``) is
    set, so a key only ever reaches its own backend. ``tier``: lower tiers are used first
    (provisioned = 0); ``weight``: share within the tier; ``rpm``/``tpm``: known quotas for pacing.
    """

    def __new__(
        cls,
        name: str,
        endpoint: str,
        *,
        deployment: str | None = None,
        region: str | None = None,
        api_key: str | None = None,
        token_provider: Callable[[], str] | None = None,
        tier: int = 1,
        weight: int = 1,
        rpm: float | None = None,
        tpm: float | None = None,
    ) -> Backend: ...
    @property
    def name(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def deployment(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def tier(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def rpm(self) -> float | None: ...
    @property
    def tpm(self) -> float | None: ...

@final
class Engine:
    """Retry, backends, adaptive limit, pacing and statistics shared by every call of a transport."""

    # Defaults (from the Rust core): max_attempts 5, deadline 120 s, max_wait 60 s, backoff 0.5 s
    # doubling to 8 s, hint_jitter 0.1, budget 10 s window, 10 retries/s, ratio 0.2; concurrency
    # starts at 4 within [1, 256]; no known rpm/tpm (learned from headers); queue_timeout 30 s;
    # async calls hedged after the p95 latency (hedge_quantile 0.95; None turns hedging off) once a
    # backend has 20 samples, at most 5 % extra requests (hedge_budget 0.05) over 10 s.
    def __new__(
        cls,
        *,
        backends: list[Backend] | None = None,
        max_attempts: int = ...,
        deadline: float | None = ...,
        max_wait: float = ...,
        backoff_base: float = ...,
        backoff_cap: float = ...,
        hint_jitter: float = ...,
        budget_ttl: float = ...,
        budget_min_per_sec: int = ...,
        budget_ratio: float = ...,
        seed: int | None = None,
        initial_concurrency: int | None = None,
        min_concurrency: int = ...,
        max_concurrency: int = ...,
        rpm: float | None = None,
        tpm: float | None = None,
        queue_timeout: float = ...,
        chars_per_token: float | None = None,
        prompt_share: float | None = None,
        default_completion_tokens: int | None = None,
        hedge_quantile: float | None = ...,
        hedge_min_samples: int = ...,
        hedge_budget: float = ...,
    ) -> Engine: ...
    def start(self, body: bytes | None = None, origin: str | None = None) -> Call:
        """Opens a call: one user request, however many attempts it takes. ``body`` feeds the
        token estimate; ``origin`` (``host[:port]``) names a passthrough engine's 403 record."""
    @property
    def passthrough(self) -> bool: ...
    @property
    def backends(self) -> list[Backend]: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def deadline(self) -> float | None: ...
    @property
    def max_wait(self) -> float: ...
    @property
    def backoff_base(self) -> float: ...
    @property
    def backoff_cap(self) -> float: ...
    @property
    def hint_jitter(self) -> float: ...
    @property
    def budget_ttl(self) -> float: ...
    @property
    def budget_min_per_sec(self) -> int: ...
    @property
    def budget_ratio(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def initial_concurrency(self) -> int: ...
    @property
    def min_concurrency(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def rpm(self) -> float | None: ...
    @property
    def tpm(self) -> float | None: ...
    @property
    def queue_timeout(self) -> float: ...
    @property
    def hedge_quantile(self) -> float | None: ...
    @property
    def hedge_min_samples(self) -> int: ...
    @property
    def hedge_budget(self) -> float: ...
    def budget_remaining(self) -> int:
        """Retries the budget still allows now."""
    def stats(self) -> dict[str, Any]:
        """``{"backends": {name: {requests, successes, retries, hedges, hedge_wins, throttled:
        {quota, capacity, provisioned, unknown, total}, blocked, server_errors, connect_errors,
        timeouts, client_errors, headroom, headroom_before_throttle, last_throttle_at, latency:
        {count, p50, p95, p99}, gauges: {limit, in_flight, queue_depth, cooldown_until, breaker,
        breaker_until}, region}}, "blocks": [support record, ...]}``; times in epoch seconds.
        ``in_flight`` counts attempts holding a permit (a success until its body ends),
        ``queue_depth`` the calls waiting for one."""
    def diagnose(self) -> Diagnosis:
        """Why throttling happened, from what was observed, and the 403 support records."""

@final
class Call:
    """One user request through its attempts."""

    @staticmethod
    def needs_body(status: int) -> bool:
        """Whether the first MAX_ERROR_BODY bytes of the body must be read before on_response."""
    def next(self) -> _Next:
        """What to do next: send an attempt, wait, queue for a permit, or fail."""
    @property
    def passes_wake_on(self) -> bool:
        """Whether this call, if a returned permit woke it from the queue before its latest
        ``next()``, wakes the next queued call (it took its permit and room is left, or it fails)."""
    @property
    def attempts(self) -> int: ...
    @property
    def last_outcome(self) -> str | None: ...
    @property
    def tokens(self) -> int: ...
    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""
    def error_body_wait(self) -> float:
        """Seconds to wait, at most, for the start of an error body (10 s, never past the deadline)."""
    def set_origin(self, origin: str) -> None:
        """Names the request's host[:port] for a passthrough engine's 403 support record."""
    def forget(self) -> None:
        """Ends the call: it leaves the permit queue (queue_depth) if it waited there. Idempotent."""
    def hedge_delay(self, primary: Attempt) -> float | None:
        """Seconds to let ``primary`` run before hedging it; None when the call is not hedged."""
    def hedge(self, primary: Attempt) -> Attempt | None:
        """A hedge of the running ``primary`` to another backend, if the hedge budget allows one."""

@final
class Attempt:
    """One send, owning its permit; dropped without an outcome, it is cancelled."""

    @property
    def backend(self) -> str: ...
    @property
    def region(self) -> str | None: ...
    @property
    def rewrites(self) -> bool: ...
    @property
    def open(self) -> bool: ...
    @property
    def support_request(self) -> str | None: ...
    @property
    def hedge(self) -> bool: ...
    def plan(
        self, url: str, body: bytes | None
    ) -> tuple[str, bytes, tuple[bytes, bytes] | None, bytes | None]:
        """How the request is rewritten for the attempt's backend: (url, host header value,
        auth header or None, new body or None); drop the headers in REWRITE_REMOVES first."""
    def on_response(
        self,
        status: int,
        headers: _Headers,
        body_prefix: bytes | None = None,
    ) -> _After:
        """Decides what follows a response; the permit goes back now."""
    def on_response_streamed(
        self,
        status: int,
        headers: _Headers,
        body_prefix: bytes | None = None,
    ) -> tuple[_After, Lease | None]:
        """Decides what follows a response whose body is handed up as a stream: a success keeps
        its permit in the Lease until the body ends; any other outcome gives it back now."""
    def on_error(self, kind: Literal["timeout", "connect"]) -> _After:
        """Decides what follows an attempt that got no response."""
    def cancel(self) -> None:
        """Ends the attempt without an outcome; its permit goes back. Idempotent."""

@final
class Lease:
    """A success's permit, held while its body is read; dropped while open, it is cancelled."""

    @property
    def backend(self) -> str: ...
    @property
    def open(self) -> bool: ...
    def finish(self) -> bool:
        """The body was read to its end (a success). Whether this ended the lease."""
    def fail(self) -> bool:
        """The body broke off (a connection failure). Whether this ended the lease."""
    def cancel(self) -> bool:
        """The body was closed early (no outcome). Whether this ended the lease."""

@final
class Failure:
    """Why a call cannot be served."""

    @property
    def kind(self) -> Literal["blocked", "overloaded", "no_backend", "deadline_exceeded"]: ...
    @property
    def message(self) -> str: ...
    @property
    def record(self) -> dict[str, Any] | None: ...
    @property
    def support_request(self) -> str | None: ...

@final
class Diagnosis:
    """Findings (quota, capacity, provisioned, region, blocked), with their figures."""

    @property
    def text(self) -> str: ...
    @property
    def kinds(self) -> list[str]: ...
    def to_dict(self) -> dict[str, Any]:
        """``{"findings": [{kind, backend, region, summary, evidence, advice, support_record}]}``."""

def _run_retry_layer(
    engine: Engine,
    url: str,
    *,
    method: str = "POST",
    body: bytes = ...,
    headers: list[tuple[str, str]] = ...,
) -> tuple[int, int, list[float], bytes, str | None]:
    """Test/benchmark hook: one request through the Rust RetryLayer over a hyper client."""
