"""`oc-engine generate`: options build `SamplingParams`, `GuardConfig` and an `LLM`; it prints."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from oc_engine.cli.common import (FiniteFloat, check_output_file, engine_config, engine_options, guard_options,
                                       guard_setup, json_option, model_option, pick_fields, seed_option, user_errors,
                                       write_text_file)
from oc_engine.cli.config_file import config_option
from oc_engine.errors import OcEngineError


@click.command()
@config_option(sections=("engine", "guard", "policy", "sampling"))
@model_option
@click.option("--prompt", default=None, help="One prompt (the user turn of the chat template).")
@click.option("--prompts-file", type=click.Path(dir_okay=False), default=None,
              help="Several prompts, decoded together: JSONL with a 'prompt' field, or one per line.")
@click.option("--max-new-tokens", "max_tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Keep going past end-of-sequence (fixed-length runs for benchmarks).")
@click.option("--stop", "stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0 = greedy; above 0 samples.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens.")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=None,
              help="Sample from the smallest set holding this much probability.")
@seed_option(None, "Seed for sampling (reproducible runs).")
@engine_options
@json_option("Print one JSON object per prompt instead of text.")
@guard_options
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
              help="Write per-token JSONL: token id, score, EMA, guard state, events. Tokens never shown "
                   "(held, then blocked or stopped) are written with a null token id unless --trace-held.")
@click.option("--trace-held", is_flag=True, help="With --trace: also write the ids of tokens the guard never showed.")
@user_errors
def generate(model, prompt, prompts_file, as_json, trace_file, trace_held, **fields):
    """Generate text for one prompt or several, streaming it as the guard releases it.

    \b
    Examples:
      oc-engine generate --prompt "Explain SQL injection at a high level"
      oc-engine generate --prompt "Write a haiku" --temperature 0.8 --top-p 0.95 --seed 1
      oc-engine generate --prompts-file prompts.jsonl --max-new-tokens 64 --json
    """
    from oc_engine.engine.prompts import read_prompts_file
    from oc_engine.llm import LLM
    from oc_engine.params import SamplingParams

    if (prompt is None) == (prompts_file is None):
        raise OcEngineError("give exactly one of --prompt or --prompts-file")
    if trace_held and not trace_file:
        raise OcEngineError("--trace-held needs --trace FILE")
    check_output_file(trace_file, "--trace")
    prompts = [prompt] if prompt is not None else read_prompts_file(prompts_file)
    announce = (lambda message: None) if as_json else (lambda message: click.echo(f"oc-engine: {message}", err=True))
    params = SamplingParams(**pick_fields(fields, SamplingParams))
    config = engine_config(fields)
    config = config.replace(max_num_seqs=min(config.max_num_seqs, len(prompts)))
    setup = guard_setup(model, fields, announce, record_trace=trace_file is not None)
    with LLM(model, config, setup, log=announce) as llm:
        if config.max_model_len is None:
            llm.fit(prompts, params)
        if config.compile and not as_json:
            announce("the decode step compiles before the second token (tens of seconds on CPU the first "
                     "time, cached after; --no-compile skips it)")
        streaming = len(prompts) == 1 and not as_json
        sequences = llm.run(prompts, params, on_event=_Printer().event if streaming else None)
        if trace_file:
            thresholds = {"warn": llm.probe.config.warn, "pause": llm.probe.config.pause}
            rows = [{"sequence": i, **row, **thresholds}
                    for i, seq in enumerate(sequences) for row in seq.guard.trace_rows(include_held=trace_held)]
            write_text_file(trace_file, "".join(json.dumps(row) + "\n" for row in rows))
        for i, seq in enumerate(sequences):
            c = seq.completion
            if as_json:
                click.echo(json.dumps(_json_row(i, prompts[i], c, llm), ensure_ascii=False))
            elif streaming:
                if c.guard is not None and c.guard.status != "completed":
                    click.echo(f"[{c.guard.status}: {c.guard.reason}]", err=True)
            else:
                status = f", {c.guard.status}" if c.guard else ""
                click.echo(f"=== [{i}] {c.finish_reason}{status}, {c.generated_tokens} tokens ===")
                click.echo(c.shown_text)


class _Printer:
    """Streams one request's released text to stdout; a refusal starts on its own line."""

    def __init__(self):
        self.last = "\n"

    def event(self, event) -> None:
        from oc_engine.outputs import Finished, Refused, TextReleased, refusal_piece

        if isinstance(event, TextReleased):
            self._write(event.text)
        elif isinstance(event, Refused):
            self._write(refusal_piece(self.last, event.text))  # `last` is "\n" until text is shown
        elif isinstance(event, Finished) and self.last != "\n":
            self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text[-1]


def _json_row(index: int, prompt: str, c, llm) -> dict:
    t = c.timings
    row = {"index": index, "model": llm.loaded.source, "prompt": prompt, "text": c.text, "refusal": c.refusal,
           "token_ids": list(c.token_ids), "prompt_tokens": len(c.prompt_token_ids),
           "generated_tokens": c.generated_tokens, "finish_reason": c.finish_reason,
           "queued_ms": t.queued_ms, "prefill_ms": t.prefill_ms, "ttft_ms": t.ttft_ms,
           "first_text_ms": t.first_text_ms,
           "decode_tokens_per_s": t.decode_tokens_per_s, "compile_ms": llm.compile_ms,
           "dtype": str(llm.loaded.dtype).removeprefix("torch."), "quantization": llm.loaded.quantization,
           "device": str(llm.loaded.device), "compiled": llm.config.compile}
    if c.guard is not None:
        row.update(status=c.guard.status, reason=c.guard.reason, pause_points=list(c.guard.pause_points),
                   verdicts=[{k: v for k, v in dataclasses.asdict(v).items() if v is not None}
                             for v in c.guard.verdicts])
    return row

