"""What every command shares: library errors as one-line CLI errors, and small printers."""

from __future__ import annotations

import json
import math
import os
from functools import wraps
from pathlib import Path

import click

from oc_engine.config import DTYPES, MAX_MODEL_LEN_CAP, QUANTIZATIONS, EngineConfig, GuardSetup
from oc_engine.errors import OcEngineError

# Seeds go to torch, numpy and Python's random; numpy takes at most 32 bits.
SEED = click.IntRange(0, 2 ** 32 - 1)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (click lets both through its bounds)."""

    name = "float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class Sizes(click.ParamType):
    """A comma-separated list of positive integers ("1,2,4"; "" for none); a config file's list
    passes through."""

    name = "sizes"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            parts = list(value)
        else:
            parts = [p.strip() for p in str(value).split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if any(size < 1 for size in sizes):
            self.fail(f"{value!r}: every size must be at least 1", param, ctx)
        return sizes


PLOT_SUFFIXES = (".png", ".pdf", ".svg")
MODEL_HELP = ("Hub id (org/name), local Hugging Face directory, or .gguf file. "
              "Default: the embedded SmolLM2-135M-Instruct.")


# -- options shared by several commands, declared once -----------------------------------
def model_option(fn):
    return click.option("--model", default=None, help=MODEL_HELP)(fn)


ENGINE_DEFAULTS = EngineConfig()  # the CLI's defaults are the library's


def dtype_option(fn):
    return click.option("--dtype", type=click.Choice(DTYPES), default=ENGINE_DEFAULTS.dtype, show_default=True,
                        help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32.")(fn)


def quantize_option(fn):
    return click.option("--quantize", type=click.Choice(("none",) + QUANTIZATIONS), default="none", show_default=True,
                        help="Weight-only quantization of the linear layers: int8 (per channel) or int4 (groups "
                             "of 32, like Q4_1). A probe made without it must be re-validated first "
                             "(oc-engine revalidate-probe).")(fn)


def device_option(fn):
    return click.option("--device", default=ENGINE_DEFAULTS.device, show_default=True,
                        help="auto, cpu, cuda or cuda:N.")(fn)


SLOTS_HELP = ("Requests decoded together (cache slots: continuous batching, one starts as another ends); each "
              "costs compute every step.")


def engine_options(fn=None, *, max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs, slots_help: str = SLOTS_HELP):
    """`EngineConfig`'s fields as options, shared by `generate` and `serve`; `engine_config`
    reads them back. `@engine_options`, or `@engine_options(max_num_seqs=N, slots_help=...)`
    for a command whose own measurements chose another default slot count."""
    if fn is None:
        return lambda f: engine_options(f, max_num_seqs=max_num_seqs, slots_help=slots_help)
    options = [
        dtype_option, quantize_option, device_option,
        click.option("--no-compile", is_flag=True, help="Run the decode step eagerly (no torch.compile warm-up)."),
        click.option("--max-num-seqs", type=click.IntRange(min=1), default=max_num_seqs, show_default=True,
                     help=slots_help),
        click.option("--max-model-len", type=click.IntRange(min=2), default=None,
                     help=f"Prompt plus answer, in tokens [default: the model's context, at most "
                          f"{MAX_MODEL_LEN_CAP}; generate sizes it to its prompts]."),
        click.option("--prefill-chunk", type=click.IntRange(min=0), default=ENGINE_DEFAULTS.prefill_chunk,
                     show_default=True, help="Prompt tokens prefilled per step at most, between decode steps, so "
                                             "that a long prompt joining does not stall the running answers "
                                             "(0: a prompt at once)."),
        click.option("--batch-buckets", type=Sizes(), default=",".join(map(str, ENGINE_DEFAULTS.batch_buckets)),
                     show_default=True,
                     help="Batch sizes below --max-num-seqs that the decode step is also compiled for, when "
                          "serve starts (two compiles each: 35-66 s cold, 3-5 s warm on a 2-core CPU): a step "
                          "runs over the smallest that holds its live requests, so one request alone does not "
                          "pay for every slot (\"\": only --max-num-seqs). generate does not warm up: its compiled "
                          "steps run over all its slots."),
        click.option("--no-chat-template", is_flag=True, help="Feed text prompts as raw text."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off unless asked)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def engine_config(fields: dict) -> EngineConfig:
    """The `EngineConfig` that `engine_options` asked for (their values are taken out of `fields`)."""
    values = dict(dtype=fields.pop("dtype"), quantize=fields.pop("quantize"), device=fields.pop("device"),
                  compile=not fields.pop("no_compile"), max_num_seqs=fields.pop("max_num_seqs"),
                  max_model_len=fields.pop("max_model_len"), prefill_chunk=fields.pop("prefill_chunk") or None,
                  batch_buckets=fields.pop("batch_buckets"),
                  chat_template=not fields.pop("no_chat_template"),
                  trust_remote_code=fields.pop("trust_remote_code"))
    return EngineConfig(**values)


def probe_option(help: str = "Probe directory (default: the shipped probe, with the embedded model)."):
    return click.option("--probe", "probe_dir", default=None, type=click.Path(file_okay=False), help=help)


def classifier_option(help: str = "Second stage: a state reader directory (`train-reader`), an exchange "
                                  "classifier export, or a delta directory (built into the cache on first use); "
                                  "embedded:reader and embedded:encoder name the shipped ones. Default: with the "
                                  "embedded model its state reader, else the shipped encoder (all-MiniLM-L6-v2)."):
    return click.option("--classifier", "classifier_dir", default=None, type=click.Path(file_okay=False), help=help)


def final_check_option(help: str = "The second stage judges the whole answer before its end is shown [default: "
                                   "on for an answer that is not streamed (generate --json or --prompts-file, an "
                                   "API request without stream), off for a streamed one]."):
    return click.option("--final-check/--no-final-check", default=None, help=help)


def input_check_option(help: str = "The classifier judges the prompt alone while it is prefilled; no token is "
                                   "shown before that verdict, and a block shows only the refusal [default: off]. "
                                   "It judges text: it needs an exchange classifier (--classifier "
                                   "embedded:encoder with the embedded model), not a state reader."):
    return click.option("--input-check/--no-input-check", default=None, help=help)


def guard_options(fn):
    """The guard's options, shared by `generate` and `serve`: which probe and classifier, the
    probe's thresholds, and the policy (`GuardConfig`'s fields by name)."""
    from oc_engine.guard.policy import MAX_DEADLINE_S, GuardConfig

    policy = GuardConfig()  # the CLI's defaults are the library's
    options = [
        click.option("--probe", "probe_dir", type=click.Path(file_okay=False), default=None,
                     help="Guard with this probe directory (probe.safetensors + probe_config.json; train one for "
                          "your model: docs/own-model.md). Default: the probe shipped for the embedded model; "
                          "another model without --probe is refused unless --no-guard."),
        click.option("--no-guard", is_flag=True, help="Plain, unguarded generation: no probe, no second stage."),
        classifier_option(), final_check_option(), input_check_option(),
        click.option("--warn", type=FiniteFloat(0, 1), default=None, help="Override the probe's warn threshold."),
        click.option("--pause", type=FiniteFloat(0, 1), default=None, help="Override the probe's pause threshold."),
        click.option("--every", type=click.IntRange(min=1), default=None, help="Check the probe every N tokens."),
        click.option("--alpha", type=FiniteFloat(0, 1, min_open=True), default=None, help="Override the EMA alpha."),
        click.option("--refusal", default=None, help="Text shown in place of a blocked answer."),
        click.option("--uncertain", type=click.Choice(["final", "block"]), default=policy.uncertain, show_default=True,
                     help="An uncertain verdict keeps holding until the final check, or blocks."),
        click.option("--on-failure", type=click.Choice(["block", "stop"]), default=policy.on_failure,
                     show_default=True,
                     help="Classifier error or missed deadline: show the refusal, or just stop. Held text is "
                          "never shown."),
        click.option("--deadline", "deadline_s", type=FiniteFloat(min=0, max=MAX_DEADLINE_S, min_open=True),
                     default=policy.deadline_s, show_default=True,
                     help="Seconds a verdict may take, from its check's submission to its arrival; a later one "
                          "counts as a failure (fail closed), whatever it says."),
        click.option("--max-held", type=click.IntRange(min=1), default=policy.max_held, show_default=True,
                     help="Held tokens past which that sequence's decoding waits for its verdict."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


NEEDS_PROBE = "--final-check, --input-check and --trace need the guard: drop --no-guard"
NO_PROBE = ("no probe for {model}: a probe ships only for the embedded model. Give --probe DIR (train one: "
            "docs/own-model.md), or --no-guard for plain, unguarded generation")


def guard_setup(model, fields: dict, log, *, record_trace: bool = False) -> GuardSetup:
    """The `GuardSetup` that `guard_options` asked for (their values are taken out of `fields`):
    the probe with --warn/--pause/--every/--alpha applied, the classifier and the policy
    (`GuardConfig`'s fields by name); `UNGUARDED` for --no-guard. A model with no probe (given,
    or shipped for the embedded model) is an error, never silently unguarded."""
    import dataclasses

    from oc_engine.config import DEFAULT, UNGUARDED
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.guard.probe import load_probe
    from oc_engine.models.defaults import resolve_probe_dir

    no_guard, probe_dir, classifier_dir = fields.pop("no_guard"), fields.pop("probe_dir"), fields.pop("classifier_dir")
    thresholds = {name: fields.pop(name) for name in ("warn", "pause", "every", "alpha")}
    guard_fields = {k: v for k, v in pick_fields(fields, GuardConfig).items() if v is not None}  # None: default
    if no_guard and (probe_dir or classifier_dir):  # a flag overrides the --config file's opposite
        from oc_engine.cli.config_file import from_the_file

        if from_the_file("no_guard"):
            no_guard = False
        elif all(from_the_file(name) for name, value in (("probe_dir", probe_dir), ("classifier_dir", classifier_dir))
                 if value):
            probe_dir = classifier_dir = None
        else:
            raise OcEngineError("--no-guard excludes --probe and --classifier")
    if no_guard:
        if guard_fields.get("final_check") or guard_fields.get("input_check") or record_trace:
            raise OcEngineError(NEEDS_PROBE)
        return UNGUARDED
    probe_path = resolve_probe_dir(probe_dir, model is None, log)
    if probe_path is None:  # never silently unguarded
        from oc_engine.models.loading import check_model_source

        if model is not None:
            check_model_source(model)  # a model that does not exist is said first
        raise OcEngineError(NO_PROBE.format(model=model))
    probe = load_probe(probe_path)
    probe = dataclasses.replace(probe, config=probe.config.with_overrides(**thresholds))
    return GuardSetup(probe=probe, classifier=classifier_dir or DEFAULT,
                      policy=GuardConfig(every=probe.config.every, **guard_fields), record_trace=record_trace)


def pick_fields(fields: dict, cls) -> dict:
    """The options named like the dataclass's fields (the CLI maps options onto fields by name)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {name: (tuple(value) if isinstance(value, list) else value) for name, value in fields.items()
            if name in names}


def batch_size_option(fn):
    """Training commands' forward passes over recorded exchanges (decoding's concurrency is
    --max-num-seqs: another setting, so another name)."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                        help="Exchanges per forward pass while reading the model's states.")(fn)


def seed_option(default: int | None = 0, help: str | None = None):
    return click.option("--seed", type=SEED, default=default, show_default=default is not None, help=help)


def json_option(help: str = "Print JSON instead of text."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def out_option(help: str = "Also write the JSON report here.", **kwargs):
    return click.option("--out", type=click.Path(dir_okay=False), default=None, help=help, **kwargs)


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


def check_output_file(path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Fail before any work (a model load, minutes of decoding) if `path` could not be written
    at the end: a directory, an unknown file type, or no writable directory to put it in.
    Nothing is created here."""
    if not path:
        return
    target = Path(path)
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise OcEngineError(f"{option} {path}: unknown file type {target.suffix or '(none)'!r}; "
                            f"use one of {', '.join(suffixes)}")
    if target.is_dir():
        raise OcEngineError(f"{option} {path} is a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise OcEngineError(f"{option} {path} is not writable")
    _check_can_create_in(target.parent, option, path)


def check_output_dir(path: str | None, option: str) -> None:
    """Fail before any work if the directory `path` could not be made at the end: an existing
    file, or no writable directory to make it in. (Whether an existing directory may be
    replaced is the command's own rule.) Nothing is created here."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OcEngineError(f"{option} {path} exists and is not a directory")
    _check_can_create_in(target if target.exists() else target.parent, option, path)


def _check_can_create_in(directory: Path, option: str, path: str) -> None:
    """Missing directories are made when the output is written: the first existing one decides."""
    while not directory.exists():
        directory = directory.parent
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise OcEngineError(f"{option} {path}: cannot write in {directory}")


def write_text_file(path: str | Path, text: str) -> None:
    """Write `text` to `path`, making its directory; a failure is one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OcEngineError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_json(out: str | None, report: dict) -> None:
    """Also write the report to `out` (when given), making its directory."""
    if out:
        write_text_file(out, json.dumps(report, indent=2) + "\n")
