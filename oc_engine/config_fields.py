"""Typed reads of the JSON configuration files the project loads (probe and classifier configs).

JSON gives any value for any key. Coercing (`int("12")`, `tuple("abc")`, `bool("false")`)
would turn a mistake into a different configuration, so every read checks the type and
fails with one line that names the file and the field.
"""

from __future__ import annotations

import math

from oc_engine.errors import OcEngineError

REQUIRED = object()


class Fields:
    def __init__(self, raw, where: str):
        if not isinstance(raw, dict):
            raise OcEngineError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def _get(self, key: str, default):
        if key not in self.raw or (self.raw[key] is None and default is not REQUIRED):
            if default is REQUIRED:
                raise OcEngineError(f"{self.where}: missing field {key!r}")
            return default
        return self.raw[key]

    def _fail(self, key: str, expected: str):
        raise OcEngineError(f"{self.where}: {key!r} must be {expected}, got {self.raw[key]!r}")

    def integer(self, key: str, default=REQUIRED) -> int:
        value = self._get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
            self._fail(key, "an integer")
        return value

    def number(self, key: str, default=REQUIRED) -> float:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(key, "a finite number")
        return float(value)

    def boolean(self, key: str, default=REQUIRED) -> bool:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            self._fail(key, "true or false")
        return value

    def string(self, key: str, default=REQUIRED) -> str | None:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            self._fail(key, "a string")
        return value

    def integers(self, key: str, default=REQUIRED) -> tuple[int, ...]:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            self._fail(key, "a list of integers")
        return tuple(value)

    def strings(self, key: str, default=REQUIRED) -> tuple[str, ...]:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            self._fail(key, "a list of strings")
        return tuple(value)

    def mapping(self, key: str, default=REQUIRED) -> dict:
        value = self._get(key, default)
        if value is not default and not isinstance(value, dict):
            self._fail(key, "an object")
        return value

    def child(self, key: str) -> "Fields":
        self.mapping(key)
        return Fields(self.raw[key], f"{self.where}: {key}")
