"""Runs one contender of the goodput benchmark: the workload of a schedule (from ``aoai-bench
schedule``) against a running simulator, with concurrent async callers, and prints per-call
results as JSON on stdout.

Runs under the repo's venv (openai 3 / httpx2: ``sdk``, ``tower-py``) or under
``bench/.venv-peers`` (openai < 3 / httpx: ``sdk2``, ``priority-lb``, ``litellm``), so it imports
only what the chosen contender needs.

    python bench/contenders.py --contender sdk --spec spec.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

API_VERSION = "2024-10-21"

#: A call: (stream, on_first_chunk) -> awaitable finishing when the whole answer is read.
CallFn = Callable[[bool, Callable[[], None]], Awaitable[None]]


def resource_url(spec: dict[str, Any], target: dict[str, Any]) -> str:
    url: str = spec["resources"].get(target["resource"]) or f"{spec['server']}/r/{target['resource']}"
    return url


def messages(spec: dict[str, Any]) -> tuple[list[dict[str, str]], int | None]:
    body = spec["schedule"]["body"]
    return body["messages"], body.get("max_tokens")


async def consume_openai(create: Awaitable[Any], stream: bool, first: Callable[[], None]) -> None:
    res = await create
    if stream:
        async for _chunk in res:
            first()
    else:
        first()


def openai_call(client: Any, deployment: str, spec: dict[str, Any]) -> CallFn:
    """One benchmark call through an openai SDK client: the scenario's chat request to
    `deployment`, streamed or not, `first` called at the first token."""
    msgs, max_tokens = messages(spec)

    async def call(stream: bool, first: Callable[[], None]) -> None:
        await consume_openai(
            client.chat.completions.create(model=deployment, messages=msgs, max_tokens=max_tokens, stream=stream),
            stream,
            first,
        )

    return call


def sdk(spec: dict[str, Any]) -> tuple[CallFn, Callable[[], dict[str, Any]]]:
    """The openai SDK with its defaults (max_retries=2), on the first target only."""
    import openai

    t0 = spec["schedule"]["targets"][0]
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=resource_url(spec, t0), api_key=t0["api_key"], api_version=API_VERSION
    )
    call = openai_call(client, t0["deployment"], spec)

    return call, lambda: {"openai": openai.__version__, "max_retries": client.max_retries}


def tower_py(spec: dict[str, Any]) -> tuple[CallFn, Callable[[], dict[str, Any]]]:
    """tower-aoai's AsyncTransport under the openai SDK (default max_retries), every target a
    backend."""
    import httpx2
    import openai
    import tower_aoai

    targets = spec["schedule"]["targets"]
    backends = [
        tower_aoai.Backend(
            t["name"],
            resource_url(spec, t),
            deployment=t["deployment"],
            region=t["region"],
            api_key=t["api_key"],
            tier=t["tier"],
        )
        for t in targets
    ]
    transport = tower_aoai.AsyncTransport(backends=backends, seed=spec.get("seed", 1))
    t0 = targets[0]
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=resource_url(spec, t0),
        api_key=t0["api_key"],
        api_version=API_VERSION,
        http_client=httpx2.AsyncClient(transport=transport),
    )
    call = openai_call(client, t0["deployment"], spec)

    def info() -> dict[str, Any]:
        out: dict[str, Any] = {"openai": openai.__version__, "tower_aoai": tower_aoai.__version__}
        try:
            out["diagnosis"] = str(transport.diagnose())
        except Exception as e:  # a diagnosis is a nicety; never fail the run for it
            out["diagnosis_error"] = repr(e)
        return out

    return call, info


def priority_lb(spec: dict[str, Any]) -> tuple[CallFn, Callable[[], dict[str, Any]]]:
    """openai-priority-loadbalancer 1.1.1 (legacy httpx transport) under the openai SDK < 3 with
    its default retries, every resource of the targets a backend, provisioned first (priority 1)
    then standard (priority 2)."""
    import httpx
    import openai
    from openai_priority_loadbalancer import AsyncLoadBalancer, Backend  # type: ignore[import-not-found]

    targets = spec["schedule"]["targets"]
    # The balancer swaps the host and inserts a backend path: the SDK points at the server's root
    # and each backend adds its resource's `/r/{resource}` prefix. It cannot change the
    # deployment, so it balances over resources, with the first target's deployment.
    host = spec["server"].split("://", 1)[1].split(":")[0]
    backends, seen = [], set()
    for t in targets:
        if t["resource"] in seen:
            continue
        seen.add(t["resource"])
        backends.append(Backend(host, t["tier"] + 1, f"r/{t['resource']}", t["api_key"]))
    lb = AsyncLoadBalancer(backends)
    t0 = targets[0]
    client = openai.AsyncAzureOpenAI(  # type: ignore[call-overload]  # openai < 3 takes httpx
        azure_endpoint=spec["server"],
        api_key=t0["api_key"],
        api_version=API_VERSION,
        http_client=httpx.AsyncClient(transport=lb),
    )
    call = openai_call(client, t0["deployment"], spec)

    return call, lambda: {"openai": openai.__version__}


def litellm_router(spec: dict[str, Any]) -> tuple[CallFn, Callable[[], dict[str, Any]]]:
    """LiteLLM's Router over every target (simple shuffle, num_retries=2, its default cooldowns),
    provisioned deployments given order 1 and standard ones order 2 when they are mixed."""
    import litellm  # type: ignore[import-not-found]
    from litellm import Router

    litellm.suppress_debug_info = True
    # The simulator streams the same token over and over; LiteLLM would take that for a looping
    # model and fail the stream. Real answers do not repeat, so that check is switched off.
    litellm.REPEATED_STREAMING_CHUNK_LIMIT = 1_000_000
    logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    targets = spec["schedule"]["targets"]
    model_list = []
    for t in targets:
        params: dict[str, Any] = {
            "model": f"azure/{t['deployment']}",
            "api_base": resource_url(spec, t),
            "api_key": t["api_key"],
            "api_version": API_VERSION,
        }
        if any(x["tier"] for x in targets):
            params["order"] = t["tier"] + 1
        model_list.append({"model_name": "bench", "litellm_params": params})
    router = Router(model_list=model_list, num_retries=2)
    msgs, max_tokens = messages(spec)

    async def call(stream: bool, first: Callable[[], None]) -> None:
        res = await router.acompletion(model="bench", messages=msgs, max_tokens=max_tokens, stream=stream)
        if stream:
            async for _chunk in res:
                first()
        else:
            first()

    return call, lambda: {"litellm": getattr(litellm, "__version__", "?")}


CONTENDERS = {"sdk": sdk, "tower-py": tower_py, "priority-lb": priority_lb, "litellm": litellm_router}


def status_of(e: BaseException) -> int:
    code = getattr(e, "status_code", None)
    if isinstance(code, int):
        return code
    resp = getattr(e, "response", None)
    code = getattr(resp, "status_code", None)
    return code if isinstance(code, int) else 0


async def drive(spec: dict[str, Any], call: CallFn) -> dict[str, Any]:
    schedule = spec["schedule"]
    scale = float(spec["time_scale"])
    timeout = float(spec.get("call_timeout", 300.0))
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(arrival: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + arrival["at"] / scale - loop.time()))
        sent = loop.time()
        first_at: list[float] = []

        def first() -> None:
            if not first_at:
                first_at.append(loop.time())

        out: dict[str, Any] = {"stream": arrival["stream"], "ok": False, "status": 0, "error": None}
        try:
            await asyncio.wait_for(call(arrival["stream"], first), timeout)
            out["ok"] = True
            out["status"] = 200
        except asyncio.TimeoutError:
            out["error"] = "call timeout"
        except Exception as e:  # every failure is a result to count, never a crash of the run
            out["status"] = status_of(e)
            out["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        now = loop.time()
        out["latency_s"] = (now - sent) * scale
        out["finish_s"] = (now - start) * scale
        out["ttft_s"] = (first_at[0] - sent) * scale if first_at else None
        return out

    calls = await asyncio.gather(*(one(a) for a in schedule["arrivals"]))
    first_at = schedule["arrivals"][0]["at"] if schedule["arrivals"] else 0.0
    return {
        "calls": calls,
        "makespan_s": max((c["finish_s"] for c in calls), default=0.0) - first_at,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contender", required=True, choices=sorted(CONTENDERS))
    ap.add_argument("--spec", required=True, help="JSON: schedule, server, resources, time_scale")
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    started = time.monotonic()
    call, info = CONTENDERS[args.contender](spec)
    result = asyncio.run(drive(spec, call))
    result["contender"] = args.contender
    result["wall_s"] = time.monotonic() - started
    result["info"] = info()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
