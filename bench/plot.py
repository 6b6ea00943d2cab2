"""Plots bench/results/goodput.json: per scenario, each contender's success rate, 429s per 100
successes and p99 latency. Runs under bench/.venv-peers (matplotlib).

    python bench/plot.py bench/results/goodput.json bench/results/goodput.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["sdk", "priority-lb", "litellm", "tower-py", "tower-rust"]
LABELS = {
    "sdk": "openai SDK",
    "priority-lb": "priority-loadbalancer",
    "litellm": "LiteLLM Router",
    "tower-py": "tower-aoai (Python)",
    "tower-rust": "tower-aoai (Rust)",
}
COLOURS = {
    "sdk": "#9e9e9e",
    "priority-lb": "#f4a259",
    "litellm": "#bc4b51",
    "tower-py": "#5b8e7d",
    "tower-rust": "#2f4858",
}


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as fh:
        data: dict[str, Any] = json.load(fh)
    scenarios = list(data["scenarios"])
    panels = [
        ("success_rate", "calls that succeeded (%)", lambda v: v * 100, False),
        ("per100_429", "429s per 100 successes (server side, log scale; 0 drawn at 0.1)", lambda v: v, True),
        ("latency_p99_s", "p99 latency of successes (simulated s)", lambda v: v, False),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 11), constrained_layout=True)
    width = 0.8 / len(ORDER)
    for ax, (key, title, f, log) in zip(axes, panels, strict=True):
        for i, c in enumerate(ORDER):
            xs, ys = [], []
            for j, s in enumerate(scenarios):
                row = next((r for r in data["scenarios"][s]["rows"] if r["contender"] == c), None)
                v = row.get("figures", {}).get(key) if row else None
                if v is not None:
                    xs.append(j + (i - (len(ORDER) - 1) / 2) * width)
                    ys.append(max(f(v), 0.1) if log else f(v))
            ax.bar(xs, ys, width, label=LABELS[c], color=COLOURS[c])
        ax.set_title(title)
        ax.set_xticks(range(len(scenarios)), scenarios)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(loc="upper right", fontsize=9)
    fig.suptitle(f"Goodput on the aoai-sim scenarios ({data.get('started', '')})")
    fig.savefig(dst, dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())
