"""The exceptions a transport raises when the engine decides a call cannot be served.

They are not ``httpx`` errors, so the openai SDK does not retry them: openai >= 3 lets them
propagate as they are (``except tower_aoai.BlockedError``); openai < 3 wraps any exception from
the transport in ``openai.APIConnectionError`` (ours is its ``__cause__``) after its own retries.
"""

from __future__ import annotations

from typing import Any


class TowerAoaiError(Exception):
    """Base class of the errors tower_aoai raises itself (not errors of the HTTP exchange)."""


class BlockedError(TowerAoaiError):
    """Every resource that could serve is temporarily blocked (403 "unusual behavior").

    ``record`` is the latest block's support record (resource, region, deployment,
    apim-request-id, time, the response without secrets) and ``support_request`` the text to
    quote in a support request.
    """

    def __init__(self, message: str, record: dict[str, Any] | None, support_request: str | None) -> None:
        super().__init__(message)
        self.record: dict[str, Any] = record or {}
        self.support_request: str = support_request or ""


class OverloadedError(TowerAoaiError):
    """No concurrency permit came within ``queue_timeout``: the backends are at their limits."""


class NoBackendError(TowerAoaiError):
    """No backend is usable within the call's deadline (all cooling down or behind a breaker)."""


class DeadlineExceededError(TowerAoaiError, TimeoutError):
    """The call's deadline passed before an attempt could be sent."""
