"""Summary statistics the benches share (plain Python: the openai client's process imports it)."""

from __future__ import annotations


def quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (q in [0, 1]) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def steady_rate(spans: list[tuple[int, float, float]], start: float, until: float) -> float | None:
    """Tokens/s from `start` until `until` (while every client had a request in flight), each
    request's (tokens, start, end) spread evenly over its life. A whole run's rate also counts
    the tail, when fewer clients are left; a guard that ends blocked answers early makes that
    tail longer without making a step slower."""
    window = until - start
    if window <= 0:
        return None
    tokens = sum(n * max(0.0, min(end, until) - begin) / max(end - begin, 1e-9) for n, begin, end in spans)
    return round(tokens / window, 2)
