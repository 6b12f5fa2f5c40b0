"""What every command shares: library errors as one-line CLI errors, and small printers."""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path

import click

from oc_engine.errors import OcEngineError


def user_errors(fn):
    """Turn library errors into a one-line message and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OcEngineError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def markdown_rows(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    """A two-column markdown table."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def progress_log(prefix: str, quiet: bool = False):
    """A logger for long steps: 'prefix: message' on stderr."""
    return (lambda message: None) if quiet else (lambda message: click.echo(f"{prefix}: {message}", err=True))


def write_json(out: str | None, report: dict) -> None:
    """Also write the report to `out` (when given), making its directory."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
