"""Plots drawn from files the CLI writes (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from oc_engine.errors import OcEngineError
from oc_engine.jsonl import iter_jsonl


def plot_trace(trace_file: str | Path, output: str | Path, sequence: int = 0) -> Path:
    """Score and EMA per token with the warn/pause thresholds; pauses and verdicts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in iter_jsonl(trace_file, required=("sequence", "index", "score", "ema"))
            if row["sequence"] == sequence]
    if not rows:
        raise OcEngineError(f"{trace_file} has no tokens for sequence {sequence}")
    x = [r["index"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(x, [r["score"] for r in rows], lw=0.8, alpha=0.6, label="probe score")
    ax.plot(x, [r["ema"] for r in rows], lw=2, label="EMA")
    ax.axhline(rows[0]["warn"], color="orange", ls="--", lw=1, label="warn")
    ax.axhline(rows[0]["pause"], color="red", ls="--", lw=1, label="pause")
    for r in rows:
        for event in r.get("events", []):
            if event["event"] == "pause":
                ax.axvline(r["index"], color="red", alpha=0.4)
            elif event["event"] == "verdict":
                colour = {"allow": "green", "block": "black"}.get(event["verdict"], "grey")
                ax.scatter([r["index"]], [1.02], marker="v", color=colour, zorder=3)
                ax.annotate(event["verdict"], (r["index"], 1.04), fontsize=7, ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("response token")
    ax.set_ylabel("risk")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"guard trace, sequence {sequence}")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return Path(output)
