"""`--config FILE`: the guard's settings in one TOML file, for `generate`, `serve` and `eval`.

    model = "gemma-3-270m-q4_k_m.gguf"   # hub id, directory or .gguf (as --model)

    [engine]      # EngineConfig: dtype, device, compile, max_num_seqs, max_model_len,
                  #   prefill_chunk, batch_buckets, quantize, chat_template, trust_remote_code
    [guard]       # enabled (false: --no-guard), probe, classifier; warn, pause, every, alpha
                  #   override the probe's thresholds
    [policy]      # GuardConfig: final_check, input_check, uncertain, on_failure, deadline_s,
                  #   max_held, refusal
    [sampling]    # generate: SamplingParams (max_tokens, temperature, top_k, top_p, seed, stop,
                  #   ignore_eos)
    [server]      # serve: host, port, backend, served_model_name, log_level, and ServerConfig's
                  #   fields (api_key, audit_log, max_tokens_limit, ...)

The keys are the library's field names, so the file means what `LLM(model, EngineConfig(...),
GuardSetup(...))` means. It is checked whole before anything loads: each section is built into
its dataclass, which validates it, so a bad value is one line naming the file, section and key.
A flag given on the command line overrides the file (the file becomes the options' defaults,
through click's `default_map`). `generate` takes [sampling], `serve` [server], all three the
model, [engine], [guard] and [policy] (what of them each has an option for); one file serves
them all. Relative paths in the file are relative to the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path

import click

from oc_engine.errors import OcEngineError

GUARD_KEYS = ("enabled", "probe", "classifier", "warn", "pause", "every", "alpha")
SERVER_CLI_KEYS = ("host", "port", "backend", "served_model_name", "log_level")
PATH_KEYS = {("guard", "probe"), ("guard", "classifier"), ("server", "audit_log")}
# Where a key's value lands among the options when the option's name is not the key's.
INVERTED = {("engine", "compile"): "no_compile", ("engine", "chat_template"): "no_chat_template",
            ("guard", "enabled"): "no_guard"}
RENAMED = {("guard", "probe"): "probe_dir", ("guard", "classifier"): "classifier_dir"}


ALL_SECTIONS = ("engine", "guard", "policy", "sampling", "server")


def config_option(fn=None, *, sections: tuple[str, ...] = ALL_SECTIONS):
    """`--config FILE`, read before every other option: the file's settings (of `sections`, which
    this command takes; the file is checked whole) become the options' defaults."""
    if fn is None:
        return lambda f: config_option(f, sections=sections)
    return click.option("--config", type=click.Path(dir_okay=False), default=None, is_eager=True,
                        expose_value=False, callback=lambda ctx, param, path: _apply(ctx, path, sections),
                        help="A TOML file of settings ([engine], [guard], [policy], [sampling], [server]: the "
                             "library's field names; docs/own-model.md). Flags given here override it.")(fn)


def _apply(ctx: click.Context, path: str | None, sections: tuple[str, ...]) -> None:
    if path is None:
        return
    try:
        settings = read_config_file(path, sections)
    except OcEngineError as exc:
        raise click.ClickException(str(exc)) from None
    names = {p.name for p in ctx.command.params}
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in settings.items() if k in names}}


def from_the_file(name: str) -> bool:
    """Whether option `name` of the running command took its value from --config (a flag given
    on the command line overrides the file, also where the two would contradict each other)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT_MAP


def read_config_file(path: str | Path, sections: tuple[str, ...] = ALL_SECTIONS) -> dict:
    """The settings of `sections` (and the model) as option values by option name; every section
    is validated, by building its dataclass. One `OcEngineError` line for the first problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OcEngineError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OcEngineError(f"--config {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise OcEngineError(f"--config {path}: not valid TOML ({exc})") from None
    checks = _sections()
    unknown = [key for key in data if key != "model" and key not in checks]
    if unknown:
        raise OcEngineError(f"--config {path}: unknown section or key {unknown[0]!r}; the file has model = ... and "
                            f"the sections {', '.join(f'[{s}]' for s in checks)}")
    options = {}
    if "model" in data:
        model = data["model"]
        if not isinstance(model, str) or not model:
            raise OcEngineError(f"--config {path}: model must be text (a hub id, directory or .gguf), got {model!r}")
        options["model"] = str(path.parent / model) if (path.parent / model).exists() else model
    for section, (keys, check) in checks.items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise OcEngineError(f"--config {path}: {section} must be a section ([{section}]), got {values!r}")
        for key in values:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {near[0]}?)" if near else f"; it takes {', '.join(keys)}"
                raise OcEngineError(f"--config {path}: [{section}] has no setting {key!r}{hint}")
        values = {key: _resolve(path, section, key, value) for key, value in values.items()}
        try:
            check(values)
        except OcEngineError as exc:
            raise OcEngineError(f"--config {path}: [{section}] {exc}") from None
        if section not in sections:
            continue
        for key, value in values.items():
            if (section, key) in INVERTED:
                options[INVERTED[section, key]] = not value
            elif (section, key) == ("engine", "prefill_chunk"):
                options["prefill_chunk"] = value or 0  # the option's 0 is the field's None
            else:
                options[RENAMED.get((section, key), key)] = tuple(value) if isinstance(value, list) else value
    return options


def _resolve(path: Path, section: str, key: str, value):
    """A relative path is relative to the file (the shipped names, embedded:..., stay as written)."""
    if (section, key) in PATH_KEYS and isinstance(value, str) and ":" not in value and not Path(value).is_absolute():
        return str(path.parent / value)
    return value


def _sections() -> dict:
    """section -> (its keys, a check that builds its dataclass)."""
    from oc_engine.config import EngineConfig, check_bool, check_int
    from oc_engine.config_fields import is_number
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.params import SamplingParams
    from oc_engine.server.config import ServerConfig

    def fields(cls, *skip):
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)

    def engine(values):
        EngineConfig(**{**values, "prefill_chunk": values.get("prefill_chunk") or None})

    def guard(values):
        check_bool("enabled", values.get("enabled", True))
        for key in ("probe", "classifier"):
            if not isinstance(values.get(key, ""), str):
                raise OcEngineError(f"{key} must be a directory (text), got {values[key]!r}")
        for key in ("warn", "pause", "alpha"):
            value = values.get(key, 1.0)
            if not is_number(value) or not (0 < value <= 1 if key == "alpha" else 0 <= value <= 1):
                raise OcEngineError(f"{key} must be a number in {'(0, 1]' if key == 'alpha' else '[0, 1]'}, "
                                    f"got {value!r}")
        if "every" in values:
            check_int("every", values["every"], 1)

    def server(values):
        cli = {k: values[k] for k in SERVER_CLI_KEYS if k in values}
        if "port" in cli and not (isinstance(cli["port"], int) and 1 <= cli["port"] <= 65535):
            raise OcEngineError(f"port must be an integer in [1, 65535], got {cli['port']!r}")
        for key in ("host", "backend", "served_model_name", "log_level"):
            if key in cli and not isinstance(cli[key], str):
                raise OcEngineError(f"{key} must be text, got {cli[key]!r}")
        ServerConfig(model_name="checked", **{k: v for k, v in values.items() if k not in SERVER_CLI_KEYS})

    return {
        "engine": (fields(EngineConfig), engine),
        "guard": (GUARD_KEYS, guard),
        "policy": (fields(GuardConfig, "every", "hold_all"), lambda values: GuardConfig(**values)),
        "sampling": (fields(SamplingParams), lambda values: SamplingParams(**{k: tuple(v) if isinstance(v, list) else v
                                                                              for k, v in values.items()})),
        "server": (SERVER_CLI_KEYS + fields(ServerConfig, "model_name"), server),
    }
