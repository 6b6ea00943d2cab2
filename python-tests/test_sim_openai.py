"""End to end: the real `openai` SDK (AzureOpenAI and OpenAI) against the aoai-sim HTTP server.

The server binary comes from `AOAI_SIM_BIN`, or is built with `cargo build -p aoai-sim` (in
`CARGO_TARGET_DIR` when set). It is started with `--port 0` and a large `--time-scale`, so the
delays it asks for (retry-after) are milliseconds of real time.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = """
seed = 3

[response]
output_tokens = 5

[[regions]]
name = "eastus2"
display_name = "East US 2"
latency = { first_token_ms = 50, per_token_ms = 10, error_ms = 5 }

[[regions]]
name = "westeurope"
display_name = "West Europe"
latency = { first_token_ms = 50, per_token_ms = 10, error_ms = 5 }
capacity = { always = true, max_concurrent = 0, retry_after_s = 20 }

[[resources]]
name = "sim-east"
region = "eastus2"
api_key = "sim-key-east"

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000000

[[resources]]
name = "sim-west"
region = "westeurope"
api_key = "sim-key-west"

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000000

[[resources]]
name = "sim-agent"
region = "eastus2"
api_key = "sim-key-agent"
abuse = { idle_s = 600, burst_requests = 2, burst_window_s = 100000, block_s = 100000 }

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000000
"""

TIME_SCALE = 1000.0
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


def _binary() -> Path:
    explicit = os.environ.get("AOAI_SIM_BIN")
    if explicit:
        return Path(explicit)
    subprocess.run(
        ["cargo", "build", "-q", "-p", "aoai-sim", "--bin", "aoai-sim"],
        cwd=ROOT,
        check=True,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    return target / "debug" / "aoai-sim"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Starts the simulator; yields its base URL (`http://127.0.0.1:PORT`)."""
    scenario = tmp_path_factory.mktemp("sim") / "scenario.toml"
    scenario.write_text(SCENARIO)
    proc = subprocess.Popen(
        [
            str(_binary()),
            "serve",
            "--scenario",
            str(scenario),
            "--port",
            "0",
            "--time-scale",
            str(TIME_SCALE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield line.removeprefix("listening on ")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _stats(base: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}/_sim/stats", timeout=5) as r:
        stats: dict[str, object] = json.loads(r.read())
        return stats


def _azure(base: str, resource: str, key: str, max_retries: int = 0) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=f"{base}/r/{resource}",
        api_key=key,
        api_version="2024-10-21",
        max_retries=max_retries,
    )


def test_azure_chat_plain(sim: str) -> None:
    client = _azure(sim, "sim-east", "sim-key-east")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=20
    )
    assert raw.headers["x-ms-region"] == "East US 2"
    assert raw.headers["x-ms-deployment-name"] == "gpt-4o"
    assert len(raw.headers["apim-request-id"]) == 36
    completion = raw.parse()
    assert completion.choices[0].message.content == "sim " * 5
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    client.close()


def test_azure_chat_stream(sim: str) -> None:
    client = _azure(sim, "sim-east", "sim-key-east")
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=3, stream=True
    )
    text = ""
    finish = None
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == "sim " * 3
    assert finish == "stop"
    assert chunks == 5  # role, 3 tokens, finish
    client.close()


def test_openai_v1_base_url_plain_and_stream(sim: str) -> None:
    client = openai.OpenAI(
        base_url=f"{sim}/r/sim-east/openai/v1", api_key="sim-key-east", max_retries=0
    )
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == "sim " * 5
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        if chunk.choices
    )
    assert text == "sim " * 5
    client.close()


def test_wrong_key_is_an_authentication_error(sim: str) -> None:
    client = _azure(sim, "sim-east", "not-the-key")
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.status_code == 401
    client.close()


def test_peak_load_429_reaches_the_sdk_which_retries_twice(sim: str) -> None:
    before = _stats(sim)["by_deployment"]
    assert isinstance(before, dict)
    seen = before.get("sim-west/gpt-4o", {}).get("429", 0)
    client = _azure(sim, "sim-west", "sim-key-west", max_retries=2)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.status_code == 429
    assert "high demand" in err.value.message
    # 20 s of virtual time at a time scale of 1000: the SDK is told to wait 20 ms.
    assert err.value.response.headers["retry-after-ms"] == "20"
    after = _stats(sim)["by_deployment"]
    assert isinstance(after, dict)
    assert after["sim-west/gpt-4o"]["429"] == seen + 3
    client.close()


def test_burst_after_idle_is_blocked_with_403(sim: str) -> None:
    client = _azure(sim, "sim-agent", "sim-key-agent")
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.status_code == 403
    assert "temporarily blocked" in err.value.message
    client.close()
