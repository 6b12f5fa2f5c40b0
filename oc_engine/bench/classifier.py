"""Classifier latency per call: ONNX Runtime (fp32, int8) vs PyTorch (fp32), batch 1.

Each backend judges one exchange of exactly `tokens` tokens (a real exchange repeated and
cut), timed around the model call alone (tokenization excluded, it is the same for all),
after warm-up; the median and 90th percentile of `repeats` calls are kept. ONNX Runtime runs
with one intra-op thread (as the guard's worker does) and with PyTorch's thread count.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from oc_engine.export.samples import SAMPLE_EXCHANGES
from oc_engine.guard.check_batcher import pad
from oc_engine.guard.classifier import load_sequence_classifier, model_inputs
from oc_engine.guard.exchange_layout import ExchangeLayout


def _encoded(tokenizer, tokens: int) -> dict:
    """One window of exactly `tokens` tokens, laid out as a check lays it out."""
    prompt, response = SAMPLE_EXCHANGES[1]
    window = ExchangeLayout(tokenizer, tokens).last_window(prompt, " ".join([response] * (tokens // 8 + 2)))
    if len(window["input_ids"]) != tokens:
        raise ValueError(f"could not build a {tokens}-token exchange")
    return pad([window], tokenizer.pad_token_id or 0)


def _time(call, repeats: int) -> dict:
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3), "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3)}


def run_classifier_bench(export_dir: str | Path, *, lengths=(128, 512), repeats: int = 30,
                         torch_threads: int | None = None, progress=lambda message: None) -> dict:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from oc_engine.export.onnx_export import ExportOptions, export_classifier
    from oc_engine.guard.classifier import load_classifier_config

    export_dir = Path(export_dir)
    config = load_classifier_config(export_dir)
    source = config.source_model
    if not source or not Path(source).is_dir():
        from oc_engine.errors import OcEngineError

        raise OcEngineError(f"{export_dir}: its source checkpoint ({source}) is needed for the PyTorch rows")
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = load_sequence_classifier(source).eval()
    threads = torch_threads or torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        int8_dir = Path(tmp) / "int8"
        progress("exporting an int8 copy")
        # Latency only: the copy is timed whatever its parity (reported beside the table);
        # `export-classifier --int8` keeps the 2e-2 gate.
        int8 = export_classifier(source, int8_dir, ExportOptions(precision="int8", max_length=max(lengths),
                                                                 tolerance=1.0, max_flip_rate=1.0))
        for precision, directory in (("fp32", export_dir), ("int8", int8_dir)):
            for ort_threads in sorted({1, threads}):  # 1: how the guard's worker runs it
                options = ort.SessionOptions()
                options.intra_op_num_threads = ort_threads
                session = ort.InferenceSession(str(directory / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
                names = [i.name for i in session.get_inputs()]
                for tokens in lengths:
                    progress(f"onnxruntime {precision} {tokens} tokens, {ort_threads} thread(s)")
                    enc = _encoded(tokenizer, tokens)
                    feeds = {n: enc[n].astype(np.int64) for n in names}
                    rows.append({"backend": "onnxruntime", "precision": precision, "tokens": tokens,
                                 "threads": ort_threads, **_time(lambda: session.run(["logits"], feeds), repeats)})
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for tokens in lengths:
                progress(f"pytorch fp32 {tokens} tokens")
                inputs = {k: torch.from_numpy(v) for k, v in model_inputs(model, _encoded(tokenizer, tokens)).items()}

                def call():
                    with torch.inference_mode():
                        model(**inputs)
                rows.append({"backend": "pytorch", "precision": "fp32", "tokens": tokens, "threads": threads,
                             **_time(call, repeats)})
        finally:
            torch.set_num_threads(previous)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "classifier": str(export_dir),
            "source_model": source, "architecture": model.config.architectures[0], "torch": torch.__version__,
            "onnxruntime": ort.__version__, "batch": 1, "repeats": repeats,
            "int8_parity": int8["parity"], "results": rows}


def classifier_markdown_table(report: dict) -> str:
    lines = [f"{report['architecture']} ({Path(report['source_model']).name}), batch 1, CPU, "
             f"onnxruntime {report['onnxruntime']}, torch {report['torch']}, {report['date'][:10]}; "
             f"int8 parity: max |delta p| {report['int8_parity']['max_abs_prob_delta']:.1e}, "
             f"{report['int8_parity']['label_flips']} label flips in {report['int8_parity']['samples']}",
             "", "| backend | precision | tokens | threads | median ms | p90 ms |", "|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['tokens']} | {r['threads']} | {r['median_ms']:.1f} "
                     f"| {r['p90_ms']:.1f} |")
    return "\n".join(lines)
