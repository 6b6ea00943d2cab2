"""tower-aoai: keep Azure OpenAI / OpenAI traffic flowing under throttling.

``Transport`` / ``AsyncTransport`` plug into ``httpx2`` clients (openai >= 3)::

    import httpx2, openai, tower_aoai
    client = openai.AzureOpenAI(
        azure_endpoint="https://eastus2.example", api_key="...", api_version="2024-10-21",
        http_client=httpx2.Client(transport=tower_aoai.Transport()),
    )

Several deployments (failover across regions, provisioned first, a 403 block isolating its
resource), the adaptive concurrency limit and pacing::

    transport = tower_aoai.Transport(
        backends=[
            tower_aoai.Backend("ptu", "https://ptu.example", deployment="gpt-4o", tier=0, api_key=k0),
            tower_aoai.Backend("east", "https://east.example", deployment="gpt-4o", api_key=k1, tpm=450_000),
            tower_aoai.Backend("west", "https://west.example", deployment="gpt-4o", api_key=k2),
        ],
        max_concurrency=32,
    )
    transport.stats()            # counters and gauges per backend, plain dicts
    print(transport.diagnose())  # quota, capacity or region? and the 403 support records

When no backend can serve, the transport raises ``BlockedError`` (with ``.record`` and
``.support_request``), ``OverloadedError`` or ``NoBackendError`` (all ``TowerAoaiError``). They are
not httpx errors, so openai >= 3 lets them through unchanged and does not retry them; openai < 3
wraps them in ``openai.APIConnectionError`` (``__cause__`` is ours).

``HttpxTransport`` / ``AsyncHttpxTransport`` are the same for the legacy ``httpx`` (openai < 3;
``pip install 'tower-aoai[legacy]'``), imported on first use. Every decision (is this a throttle,
how long to wait, which backend, may this attempt go now) is made by the Rust core in
``tower_aoai._core``. Logging goes to the ``tower_aoai`` logger and never shows a key or token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import MAX_ERROR_BODY, Attempt, Backend, Call, Diagnosis, Engine, Failure, Lease, __version__
from ._errors import BlockedError, DeadlineExceededError, NoBackendError, OverloadedError, TowerAoaiError
from ._transports import AsyncTransport, Transport

if TYPE_CHECKING:
    from ._legacy import AsyncHttpxTransport, HttpxTransport

__all__ = [
    "MAX_ERROR_BODY",
    "AsyncHttpxTransport",
    "AsyncTransport",
    "Attempt",
    "Backend",
    "BlockedError",
    "Call",
    "DeadlineExceededError",
    "Diagnosis",
    "Engine",
    "Failure",
    "HttpxTransport",
    "Lease",
    "NoBackendError",
    "OverloadedError",
    "TowerAoaiError",
    "Transport",
    "__version__",
]

_LEGACY = ("HttpxTransport", "AsyncHttpxTransport")


def __getattr__(name: str) -> Any:
    if name in _LEGACY:
        from . import _legacy

        return getattr(_legacy, name)
    raise AttributeError(f"module 'tower_aoai' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LEGACY))
