"""A state reader's cost per check, beside the served model itself run as a sequence classifier.

A state reader's check pools the states the engine already kept for the answer (`AnswerStates`)
and runs a small MLP: its cost grows with the answer only through the pooling. The other
reader the served model offers (the model with a classification head, as Llama Guard and reward
models are) must run the whole model over the exchange at every check; it is timed here on the
same lengths, fp32 PyTorch, so the two can be compared (its head is untrained: only its time
is measured).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from oc_engine.bench.classifier import _time
from oc_engine.guard.pooled_states import AnswerStates


def run_reader_bench(reader_dir: str | Path, *, lengths=(128, 512), repeats: int = 30, served_model: bool = True,
                     progress=lambda message: None) -> dict:
    from oc_engine.guard.state_reader import load_reader

    reader = load_reader(reader_dir)
    shape = (len(reader.config.layers), reader.config.hidden_size)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in lengths:
        progress(f"state reader, {tokens} tokens")
        states = AnswerStates()
        for _ in range(tokens):
            states.add(rng.normal(size=shape).astype(np.float32))
        rows.append({"reader": "state reader (pool + MLP)", "tokens": tokens, "threads": "numpy",
                     **_time(lambda: reader.judge_features(states.features(tokens)), repeats)})
    if served_model:
        rows += _served_model_rows(lengths, max(3, repeats // 3), progress)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reader": str(reader_dir),
            "torch": torch.__version__, "batch": 1, "repeats": repeats, "results": rows}


def _served_model_rows(lengths, repeats: int, progress) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    from oc_engine.models.loading import resolve_model_source

    source = resolve_model_source(None, progress=False)  # the embedded model, converted in the cache
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3, torch_dtype=torch.float32,
                                                               use_safetensors=True).eval()
    model.config.pad_token_id = model.config.eos_token_id
    rows, previous = [], torch.get_num_threads()
    try:
        for threads in sorted({1, previous}):
            torch.set_num_threads(threads)
            for tokens in lengths:
                progress(f"served model as a classifier, {tokens} tokens, {threads} thread(s)")
                ids = torch.randint(100, 1000, (1, tokens))

                def call():
                    with torch.inference_mode():
                        model(input_ids=ids)
                rows.append({"reader": "served model + head (PyTorch fp32)", "tokens": tokens, "threads": threads,
                             **_time(call, repeats)})
    finally:
        torch.set_num_threads(previous)
    return rows


def reader_markdown_table(report: dict) -> str:
    lines = [f"check latency, batch 1, CPU, torch {report['torch']}, {report['date'][:10]}", "",
             "| reader | tokens | threads | median ms | p90 ms |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['reader']} | {r['tokens']} | {r['threads']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |")
    return "\n".join(lines)
