"""Read JSONL files with errors that name the file and line; write JSON files atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from oc_engine.errors import OcEngineError


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise on the first bad one."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise OcEngineError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        number = 0
        while True:
            number += 1
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise OcEngineError(f"{path}:{number}: not UTF-8 text") from exc
            except OSError as exc:  # a directory, say
                raise OcEngineError(f"cannot read {path}: {exc.strerror or exc}") from exc
            if not line:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OcEngineError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise OcEngineError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise OcEngineError(f"{path}:{number}: missing field {missing[0]!r}")
            yield number, row


def write_json_file(path: str | Path, obj) -> None:
    """Replace `path` with `obj` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
