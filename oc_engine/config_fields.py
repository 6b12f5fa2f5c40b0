"""Typed reads of the JSON configuration files the project loads (probe and classifier configs),
and the type tests every setting's validation shares (`is_int`, `is_number`).

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

    def _read(self, key: str, default, accepts, expected: str, convert=lambda v: v):
        """The field's value if `accepts(value)`, else a one-line error; `default` when it is
        missing (or null, for an optional field); REQUIRED makes a missing field an error."""
        if key not in self.raw or (self.raw[key] is None and default is not REQUIRED):
            if default is REQUIRED:
                raise OcEngineError(f"{self.where}: missing field {key!r}")
            return default
        value = self.raw[key]
        if not accepts(value):
            raise OcEngineError(f"{self.where}: {key!r} must be {expected}, got {value!r}")
        return convert(value)

    def integer(self, key: str, default=REQUIRED) -> int:
        return self._read(key, default, is_int, "an integer")

    def number(self, key: str, default=REQUIRED) -> float:
        return self._read(key, default, lambda v: is_number(v) and math.isfinite(v), "a finite number", float)

    def boolean(self, key: str, default=REQUIRED) -> bool:
        return self._read(key, default, lambda v: isinstance(v, bool), "true or false")

    def string(self, key: str, default=REQUIRED) -> str | None:
        return self._read(key, default, lambda v: isinstance(v, str), "a string")

    def integers(self, key: str, default=REQUIRED) -> tuple[int, ...]:
        return self._read(key, default, lambda v: isinstance(v, list) and all(map(is_int, v)),
                          "a list of integers", tuple)

    def strings(self, key: str, default=REQUIRED) -> tuple[str, ...]:
        return self._read(key, default, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                          "a list of strings", tuple)

    def mapping(self, key: str, default=REQUIRED) -> dict:
        return self._read(key, default, lambda v: isinstance(v, dict), "an object")

    def child(self, key: str) -> "Fields":
        self.mapping(key)
        return Fields(self.raw[key], f"{self.where}: {key}")


def is_int(value) -> bool:
    """An int, not a bool (JSON true is not 1): the one type test every setting uses."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
