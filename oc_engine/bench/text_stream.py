"""What turning tokens into released text costs per token, as the answer grows.

One `TextStream` per round over the same long answer (the embedded tokenizer's ids for a
repeated paragraph with accents, CJK and emoji, so characters split across tokens), with four
stop strings at the server's length limit that never match. Reported: the median cost of a
token at each of several positions (a window of tokens around it, over every round), so a
cost that grows with the answer shows as a rising row.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

from oc_engine.engine.text_stream import TextStream

PARAGRAPH = ("The café on the corner sells green tea, naïve pastries and 東京 sweets 🙂; "
             "every morning the owner writes the day's menu on a chalkboard by the door. ")
POSITIONS = (100, 500, 1000, 2000, 4000)
WINDOW = 50  # tokens measured around each position


def stop_strings(length: int = 256) -> tuple[str, ...]:
    """Four stop strings of `length` characters that share the answer's first letters, so
    each is a candidate at many places and never matches."""
    return tuple((start + "#" * length)[:length] for start in ("The café", "tea", "every ", "🙂"))


def run_text_stream_bench(tokenizer, *, rounds: int = 5, stop_chars: int = 256, progress=None) -> dict:
    ids = tokenizer(PARAGRAPH * (POSITIONS[-1] // 20))["input_ids"][:POSITIONS[-1] + WINDOW]
    stops = stop_strings(stop_chars)
    per_token: list[list[float]] = [[] for _ in ids]
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        stream = TextStream(tokenizer, stops)
        clock = time.perf_counter
        for i, token in enumerate(ids):
            start = clock()
            stream.push(token)
            per_token[i].append(clock() - start)
        assert not stream.stopped
    rows = []
    for position in POSITIONS:
        window = [t for times in per_token[position - WINDOW // 2:position + WINDOW // 2] for t in times]
        rows.append({"tokens": position, "us_per_token": round(statistics.median(window) * 1e6, 2),
                     "chars": len(tokenizer.decode(ids[:position]))})
    first = rows[0]["us_per_token"]
    return {"bench": "text-stream", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rounds": rounds, "stop_strings": len(stops), "stop_chars": stop_chars, "results": rows,
            "ratio_last_to_first": round(rows[-1]["us_per_token"] / first, 3) if first else None}


def text_stream_markdown_table(report: dict) -> str:
    lines = [f"Text stream: cost per token as the answer grows ({report['stop_strings']} stop strings of "
             f"{report['stop_chars']} characters, median of {report['rounds']} rounds)", "",
             "| tokens so far | characters | µs per token |", "|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['chars']} | {r['us_per_token']:.1f} |" for r in report["results"]]
    lines += ["", f"Last over first: {report['ratio_last_to_first']}x"]
    return "\n".join(lines)
