"""The shared safety data (`../shared/data`): where it is, and labelled exchanges read from it.

Nothing is copied into the project: files are read in place. `$OC_ENGINE_DATA` points
elsewhere; otherwise `../shared/data` is looked for beside the working directory and beside
the repository that holds this package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oc_engine.jsonl import iter_jsonl

LABELS = ("safe_compliance", "safe_refusal", "unsafe_compliance")
UNSAFE = 2


@dataclass(frozen=True)
class Exchange:
    prompt: str  # the request the response answers (a conversation's last user turn)
    response: str
    label: int  # 0 safe_compliance, 1 safe_refusal, 2 unsafe_compliance
    source: str = ""
    context: tuple[tuple[str, str], ...] = ()  # (role, content) of the turns before the request: training/contexts

    def messages(self) -> list[dict]:
        """The conversation up to the request, as chat messages."""
        return [{"role": role, "content": content} for role, content in self.context] + \
            [{"role": "user", "content": self.prompt}]


def shared_data_dir() -> Path | None:
    """The shared data directory, or None when this machine has none."""
    candidates = [os.environ.get("OC_ENGINE_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def require_shared_data_dir() -> Path:
    """The shared data directory; a clear error when this machine has none."""
    from oc_engine.errors import OcEngineError

    root = shared_data_dir()
    if root is None:
        raise OcEngineError("no shared data directory found (../shared/data, or set OC_ENGINE_DATA)")
    return root


def read_exchanges(path: str | Path, *, source_filter: str | None = None) -> tuple[list[Exchange], int]:
    """Labelled exchanges of a JSONL file; returns (exchanges, rows skipped for a null label or response).

    Every line needs `prompt`, `response` and `label` keys (the error names the line that lacks one).
    `source_filter`: keep only rows whose `source` equals it (e.g. "gptfuzz:train").
    """
    from oc_engine.errors import OcEngineError

    exchanges, skipped = [], 0
    for line, row in iter_jsonl(path, required=("prompt", "response", "label")):
        if source_filter is not None and row.get("source") != source_filter:
            continue
        if row["label"] is None or row["response"] is None:
            skipped += 1
            continue
        if isinstance(row["label"], bool) or row["label"] not in (0, 1, 2) or not isinstance(row["label"], int):
            raise OcEngineError(f"{path}:{line}: label must be 0, 1, 2 or null, got {row['label']!r}")
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise OcEngineError(f"{path}:{line}: {key!r} must be a string, got {type(row[key]).__name__}")
        exchanges.append(Exchange(row["prompt"], row["response"], row["label"], str(row.get("source") or "")))
    return exchanges, skipped


def parity_exchanges(count: int = 48) -> list[tuple[str, str]]:
    """Real (prompt, response) pairs for export parity checks, spread over the shared files."""
    root = shared_data_dir()
    if root is None:
        return []
    files = sorted((root / "train").glob("*.jsonl"))
    rows: list[tuple[str, str]] = []
    for file in files:
        try:
            exchanges, _ = read_exchanges(file)
        except Exception:  # noqa: BLE001 - prompt-only files have no labels; parity just uses others
            continue
        if exchanges:
            step = max(1, len(exchanges) // max(1, count // 3))
            rows.extend((e.prompt, e.response) for e in exchanges[::step][: count // 3 + 1])
    return rows[:count]
