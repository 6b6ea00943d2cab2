"""tower-aoai: keep Azure OpenAI / OpenAI traffic flowing under throttling.

``Transport`` / ``AsyncTransport`` plug into ``httpx2`` clients (openai >= 3)::

    import httpx2, openai, tower_aoai
    client = openai.AzureOpenAI(
        azure_endpoint="https://eastus2.example", api_key="...", api_version="2024-10-21",
        http_client=httpx2.Client(transport=tower_aoai.Transport()),
    )

``HttpxTransport`` / ``AsyncHttpxTransport`` are the same for the legacy ``httpx`` (openai < 3;
``pip install 'tower-aoai[legacy]'``), imported on first use. Every decision (is this a throttle,
how long to wait, may we retry) is made by the Rust core in ``tower_aoai._core``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import MAX_ERROR_BODY, Call, Engine, __version__
from ._transports import AsyncTransport, Transport

if TYPE_CHECKING:
    from ._legacy import AsyncHttpxTransport, HttpxTransport

__all__ = [
    "MAX_ERROR_BODY",
    "AsyncHttpxTransport",
    "AsyncTransport",
    "Call",
    "Engine",
    "HttpxTransport",
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
