"""The `oc-engine` command line. It only parses options, calls the library and prints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys

import click

from oc_engine.errors import OcEngineError


from oc_engine.commands.common import (PLOT_SUFFIXES, SEED, FiniteFloat, check_output_file,  # noqa: E402
                                       write_json, write_text_file)
from oc_engine.commands.common import user_errors as _user_errors  # noqa: E402
from oc_engine.engine.defaults import resolve_classifier, resolve_classifier_dir, resolve_probe_dir  # noqa: E402
from oc_engine.engine.guard import MAX_DEADLINE_S  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="oc-engine")
def main():
    """Guarded generation for open-weight LLMs.

    \b
    Quick start (the embedded SmolLM2-135M-Instruct; nothing to download):
      oc-engine generate --prompt "Explain SQL injection at a high level"
      oc-engine generate --prompts-file prompts.jsonl --json
      oc-engine bench
    """
    # torch warns once per process that this CPU machine has no CUDA runtime: not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


MODEL_HELP = ("Hub id (org/name), local Hugging Face directory, or .gguf file. "
              "Default: the embedded SmolLM2-135M-Instruct.")


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--prompt", default=None, help="One prompt (the user turn of the chat template).")
@click.option("--prompts-file", type=click.Path(dir_okay=False), default=None,
              help="Several prompts, decoded as one batch: JSONL with a 'prompt' field, or one per line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Keep going past end-of-sequence (fixed-length runs for benchmarks).")
@click.option("--stop", "stop_strings", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0 = greedy; above 0 samples.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens.")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=None,
              help="Sample from the smallest set holding this much probability.")
@click.option("--seed", type=SEED, default=None, help="Seed for sampling (reproducible runs).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-compile", is_flag=True, help="Run the decode step eagerly (no torch.compile warm-up).")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off unless asked).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt instead of text.")
@click.option("--probe", "probe_dir", type=click.Path(file_okay=False), default=None,
              help="Guard with this probe directory (probe.safetensors + probe_config.json). Default with the "
                   "embedded model: the probe shipped for it.")
@click.option("--no-guard", is_flag=True, help="Plain generation: no probe, no classifier.")
@click.option("--classifier", "classifier_dir", type=click.Path(file_okay=False), default=None,
              help="Exchange classifier export asked when the probe pauses. Without one, a pause blocks.")
@click.option("--final-check", is_flag=True, help="The classifier judges the whole answer before it ends.")
@click.option("--warn", type=FiniteFloat(0, 1), default=None, help="Override the probe's warn threshold.")
@click.option("--pause", type=FiniteFloat(0, 1), default=None, help="Override the probe's pause threshold.")
@click.option("--every", type=click.IntRange(min=1), default=None, help="Check the probe every N tokens.")
@click.option("--alpha", type=FiniteFloat(0, 1, min_open=True), default=None, help="Override the EMA alpha.")
@click.option("--refusal", default=None, help="Text shown in place of a blocked answer.")
@click.option("--uncertain", type=click.Choice(["final", "block"]), default="final", show_default=True,
              help="An uncertain verdict keeps holding until the final check, or blocks.")
@click.option("--on-failure", type=click.Choice(["block", "stop"]), default="block", show_default=True,
              help="Classifier error or missed deadline: show the refusal, or just stop. Held text is never shown.")
@click.option("--deadline", type=FiniteFloat(min=0, max=MAX_DEADLINE_S, min_open=True), default=5.0,
              show_default=True, help="Seconds a verdict may take, from its check's submission to its arrival; "
                                      "a later one counts as a failure (fail closed), whatever it says.")
@click.option("--max-held", type=click.IntRange(min=1), default=64, show_default=True,
              help="Held tokens past which that sequence's decoding waits for its verdict.")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
              help="Write per-token JSONL: token id, score, EMA, guard state, events. Tokens never shown "
                   "(held, then blocked or stopped) are written with a null token id unless --trace-held.")
@click.option("--trace-held", is_flag=True, help="With --trace: also write the ids of tokens the guard never showed.")
@_user_errors
def generate(model, prompt, prompts_file, max_new_tokens, ignore_eos, stop_strings, temperature, top_k, top_p,
             seed, dtype, device, no_compile, no_chat_template, trust_remote_code, as_json,
             probe_dir, no_guard, classifier_dir, final_check, warn, pause, every, alpha, refusal, uncertain,
             on_failure, deadline, max_held, trace_file, trace_held):
    """Generate text for one prompt or a batch, streaming it as it is produced.

    \b
    Examples:
      oc-engine generate --prompt "Explain SQL injection at a high level"
      oc-engine generate --prompt "Write a haiku" --temperature 0.8 --top-p 0.95 --seed 1
      oc-engine generate --prompts-file prompts.jsonl --max-new-tokens 64 --json
    """
    from oc_engine.engine.decode import Engine, GenerationConfig
    from oc_engine.engine.guard import DEFAULT_REFUSAL, GuardConfig
    from oc_engine.engine.loading import load_model, resolve_device
    from oc_engine.engine.probe import load_probe
    from oc_engine.engine.prompts import read_prompts_file, render_prompt
    from oc_engine.engine.sampling import SamplingConfig

    if (prompt is None) == (prompts_file is None):
        raise OcEngineError("give exactly one of --prompt or --prompts-file")
    if trace_held and not trace_file:
        raise OcEngineError("--trace-held needs --trace FILE")
    check_output_file(trace_file, "--trace")
    prompts = [prompt] if prompt is not None else read_prompts_file(prompts_file)
    config = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, stop_strings=tuple(stop_strings),
                              ignore_eos=ignore_eos,
                              sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    if no_guard and (probe_dir or classifier_dir):
        raise OcEngineError("--no-guard excludes --probe and --classifier")
    announce = (lambda message: None) if as_json else (lambda message: click.echo(f"oc-engine: {message}", err=True))
    if not no_guard:
        probe_dir = resolve_probe_dir(probe_dir, model is None, announce)
    if probe_dir is None and (classifier_dir or final_check or trace_file):
        raise OcEngineError("--classifier, --final-check and --trace need --probe")
    probe = None
    if probe_dir is not None:
        probe = load_probe(probe_dir)
        probe = dataclasses.replace(probe, config=probe.config.with_overrides(warn=warn, pause=pause, every=every,
                                                                             alpha=alpha))
    guard_config = GuardConfig(every=probe.config.every if probe else 1, uncertain=uncertain, on_failure=on_failure,
                               final_check=final_check, max_held=max_held, deadline_s=deadline,
                               refusal=refusal if refusal is not None else DEFAULT_REFUSAL)
    # The classifier is checked before the model loads: a bad export fails in a second, not after it.
    classifier = resolve_classifier(classifier_dir, str(resolve_device(device)), log=announce) if probe else None
    with contextlib.closing(classifier) if classifier is not None else contextlib.nullcontext():
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        engine = Engine(loaded, compile=not no_compile, probe=probe)
        token_ids = [render_prompt(loaded.tokenizer, p, chat_template=not no_chat_template) for p in prompts]
        if engine.compile and not as_json:
            click.echo("oc-engine: compiling the decode step (about a minute on CPU the first time; "
                       "--no-compile skips it)", err=True)

        stream = len(prompts) == 1 and not as_json
        on_text = (lambda _index, piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
        monitor = None
        if probe is not None:
            from oc_engine.engine.guarded import GuardMonitor

            monitor = GuardMonitor(loaded.tokenizer, prompts, guard_config, classifier,
                                   stop_strings=tuple(stop_strings), on_text=on_text,
                                   record_trace=trace_file is not None)
        results = engine.generate(token_ids, config, on_text=None if monitor else on_text, monitor=monitor)
        if trace_file:
            thresholds = {"warn": probe.config.warn, "pause": probe.config.pause}
            write_text_file(trace_file, "".join(json.dumps({**row, **thresholds}) + "\n"
                                                for row in monitor.trace_rows(include_held=trace_held)))

        for r in results:
            guard = monitor.summary(r.index) if monitor else None
            text = guard["released_text"] if guard else r.text  # only released text is ever shown
            if as_json:
                row = {
                    "index": r.index, "model": loaded.source, "prompt": prompts[r.index], "text": text,
                    "token_ids": r.token_ids if not guard else r.token_ids[:guard["released_tokens"]],
                    "prompt_tokens": len(r.prompt_ids), "finish_reason": r.finish_reason,
                    "prefill_ms": round(r.prefill_ms, 3), "ttft_ms": round(r.ttft_ms, 3),
                    "decode_tokens_per_s": None if r.decode_tokens_per_s is None else round(r.decode_tokens_per_s, 3),
                    "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
                    "compiled": engine.compile,
                }
                if guard:
                    row.update(status=guard["status"], reason=guard["reason"], pause_points=guard["pause_points"],
                               verdicts=guard["verdicts"])
                click.echo(json.dumps(row, ensure_ascii=False))
            elif stream:
                click.echo()
                if guard and guard["status"] != "completed":
                    click.echo(f"[{guard['status']}: {guard['reason']}]", err=True)
            else:
                status = f", {guard['status']}" if guard else ""
                click.echo(f"=== [{r.index}] {r.finish_reason}{status}, {len(r.token_ids)} tokens ===")
                click.echo(text)


@main.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="One dtype for every mode.")
@click.option("--device", default="auto", show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Median of this many runs.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["hf_generate", "no_kv_cache", "engine_eager",
                                                                   "engine_compiled", "engine_compiled_probe"]),
              help="Modes to run (repeatable). Default: the first four. engine_compiled_probe adds a "
                   "probe (scored every token, never pausing) to the compiled step.")
@click.option("--suite", type=click.Choice(["decode", "guard", "classifier"]), default="decode", show_default=True,
              help="decode: the modes above. guard: unguarded vs probe only vs escalating (several pauses, "
                   "classifier overlapped) vs blocking (decoding stops for each "
                   "check), round-robin, with inter-token gaps. "
                   "classifier: the classifier's latency per call, ONNX Runtime fp32/int8 vs PyTorch, 128 and "
                   "512 tokens.")
@click.option("--classifier", "classifier_dir", type=click.Path(file_okay=False), default=None,
              help="--suite guard/classifier: the classifier export (default: the built default classifier).")
@click.option("--pause-quantile", type=FiniteFloat(0.5, 0.99), default=0.9, show_default=True,
              help="--suite guard: pause when the EMA reaches this quantile of the answer's own EMA.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@_user_errors
def bench(model, dtype, device, new_tokens, repeats, modes, suite, classifier_dir, pause_quantile, out, as_json):
    """Decode speed at batch 1: Hugging Face generate vs a no-KV-cache loop vs the engine.

    \b
    Each mode is warmed up (compilation is not timed), then timed from outside: time to
    first token from a 1-token run, tokens/s from a fixed-length run (EOS ignored).
    --suite guard times every token's arrival instead and reports the gaps between tokens.
    Examples:
      oc-engine bench --dtype bfloat16 --out bench/results/cpu-decode-bf16.json
      oc-engine bench --suite guard --classifier ./classifier --repeats 5
    """
    from oc_engine.engine.loading import load_model

    check_output_file(out, "--out")
    progress = lambda mode: click.echo(f"oc-engine bench: {mode} ...", err=True)  # noqa: E731
    if suite == "classifier":
        from oc_engine.bench_classifier import classifier_markdown_table, run_classifier_bench

        directory = resolve_classifier_dir(classifier_dir, required=True)
        report = run_classifier_bench(directory, repeats=max(repeats, 10), progress=progress)
        write_json(out, report)
        click.echo(json.dumps(report, indent=2) if as_json else classifier_markdown_table(report))
        return
    loaded = load_model(model, device=device, dtype=dtype)
    if suite == "guard":
        from oc_engine.bench_guard import guard_markdown_table, run_guard_bench

        classifier = resolve_classifier(classifier_dir, str(loaded.device), required=True)
        try:
            report = run_guard_bench(loaded, classifier, new_tokens=new_tokens, repeats=repeats,
                                     quantile=pause_quantile, progress=progress)
        finally:
            classifier.close()
        table = guard_markdown_table(report)
    else:
        from oc_engine.bench import MODES, markdown_table, run_decode_bench

        report = run_decode_bench(loaded, modes=modes or MODES, new_tokens=new_tokens, repeats=repeats,
                                  progress=progress)
        table = markdown_table(report)
    write_json(out, report)
    click.echo(json.dumps(report, indent=2) if as_json else table)


@main.command("plot-trace")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", default="risk.png", show_default=True, help="Image to write (.png, .pdf or .svg).")
@click.option("--sequence", type=int, default=0, show_default=True, help="Which sequence of the trace to draw.")
@_user_errors
def plot_trace(trace_file, output, sequence):
    """Draw a --trace file: per-token score, EMA, thresholds, pause points and verdicts."""
    from oc_engine.plots import plot_trace as draw

    check_output_file(output, "-o", PLOT_SUFFIXES)
    draw(trace_file, output, sequence=sequence)
    click.echo(output)


def _register() -> None:
    from oc_engine.commands.classifier import calibrate_classifier, export_classifier, train_classifier
    from oc_engine.commands.probe import collect, eval_command, headroom_command, sweep_layers, train_probe

    for command in (export_classifier, train_classifier, calibrate_classifier, collect, train_probe, sweep_layers,
                    eval_command, headroom_command):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
