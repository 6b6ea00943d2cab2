"""Native part of tower_aoai: a sans-IO surface over the Rust policy core."""

from collections.abc import Iterable
from typing import Final, Literal, final

__all__ = ["Engine", "Call", "_run_retry_layer", "MAX_ERROR_BODY", "__version__"]
__version__: Final[str]
#: How many bytes of an error body are read to classify it.
MAX_ERROR_BODY: Final[int]

#: ``(kind, delay_seconds, reason)``: ``("return", None, None)``, ``("retry", delay, outcome)`` or
#: ``("give_up", None, reason)``.
_Action = tuple[Literal["return", "retry", "give_up"], float | None, str | None]

@final
class Engine:
    """Retry policy, retry budget and jitter source shared by every call of a transport."""

    # Defaults (from the Rust core): max_attempts 5, deadline 120 s, max_wait 60 s, backoff 0.5 s
    # doubling to 8 s, hint_jitter 0.1, budget 10 s window, 10 retries/s, ratio 0.2.
    def __new__(
        cls,
        *,
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
    ) -> Engine: ...
    def start(self) -> Call:
        """Opens a call: one user request, however many attempts it takes."""
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
    def budget_remaining(self) -> int:
        """Retries the budget still allows now."""

@final
class Call:
    """One user request through its attempts."""

    @staticmethod
    def needs_body(status: int) -> bool:
        """Whether the first MAX_ERROR_BODY bytes of the body must be read before on_response."""
    def on_response(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body_prefix: bytes | None = None,
    ) -> _Action:
        """Decides what follows a response."""
    def on_error(self, kind: Literal["timeout", "connect"]) -> _Action:
        """Decides what follows an attempt that got no response."""
    @property
    def attempts(self) -> int: ...
    @property
    def last_outcome(self) -> str | None: ...
    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""

def _run_retry_layer(
    engine: Engine,
    url: str,
    *,
    method: str = "POST",
    body: bytes = ...,
    headers: list[tuple[str, str]] = ...,
) -> tuple[int, int, list[float], bytes, str | None]:
    """Test/benchmark hook: one request through the Rust RetryLayer over a hyper client."""
