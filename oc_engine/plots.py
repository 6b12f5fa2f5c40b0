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

    rows = [row for row in read_trace(trace_file) if row["sequence"] == sequence]
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
                verdict = str(event.get("verdict"))
                colour = {"allow": "green", "block": "black"}.get(verdict, "grey")
                ax.scatter([r["index"]], [1.02], marker="v", color=colour, zorder=3)
                ax.annotate(verdict, (r["index"], 1.04), fontsize=7, ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("response token")
    ax.set_ylabel("risk")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"guard trace, sequence {sequence}")
    fig.tight_layout()
    save_figure(fig, output)
    return Path(output)


TRACE_NUMBERS = ("score", "ema", "warn", "pause")


def read_trace(trace_file: str | Path) -> list[dict]:
    """The rows of a --trace file, each checked: integer sequence and index, numbers (or null,
    NaN for a non-finite score) for score, EMA and thresholds, a list of event objects."""
    rows = []
    for number, row in iter_jsonl(trace_file, required=("sequence", "index", *TRACE_NUMBERS)):
        where = f"{trace_file}:{number}"
        for key in ("sequence", "index"):
            if isinstance(row[key], bool) or not isinstance(row[key], int):
                raise OcEngineError(f"{where}: {key!r} must be an integer, got {row[key]!r}")
        for key in TRACE_NUMBERS:
            if row[key] is not None and (isinstance(row[key], bool) or not isinstance(row[key], (int, float))):
                raise OcEngineError(f"{where}: {key!r} must be a number, got {row[key]!r}")
        events = row.get("events", [])
        if not isinstance(events, list) or not all(isinstance(e, dict) and isinstance(e.get("event"), str)
                                                   for e in events):
            raise OcEngineError(f"{where}: 'events' must be a list of objects with an 'event' name")
        rows.append({**row, "events": events,
                     **{k: float("nan") if row[k] is None else float(row[k]) for k in TRACE_NUMBERS}})
    return rows


def save_figure(fig, path: str | Path) -> None:
    """Save and close a matplotlib figure; a failure (an unknown file type, an unwritable path)
    is one line."""
    import matplotlib.pyplot as plt

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"cannot write the plot {path}: {exc}") from exc
    finally:
        plt.close(fig)
