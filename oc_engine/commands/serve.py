"""`oc-engine serve`: options build a `ServerConfig` and an `LLM` factory; the server runs."""

from __future__ import annotations

import click

from oc_engine.commands.common import (check_output_file, device_option, dtype_option, guard_options, model_option,
                                       probe_and_guard, progress_log, quantize_option, user_errors)


@click.command()
@model_option
@click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="vllm: decode with vLLM (its scheduler, paged cache and parallelism) and guard here; needs the "
                   "plugin's environment: uv run --project integrations/vllm oc-engine serve --backend vllm.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None,
              help="The name clients send as 'model' [default: the model's name or path].")
@dtype_option
@quantize_option
@device_option
@click.option("--no-compile", is_flag=True, help="Run the decode step eagerly (no torch.compile warm-up).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (cache slots); each costs compute every step.")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None,
              help="Prompt plus answer, in tokens [default: the model's context, at most 2048].")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off unless asked).")
@guard_options
@click.option("--api-key", envvar="OC_ENGINE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (or set OC_ENGINE_API_KEY).")
@click.option("--max-waiting", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests accepted beyond --max-num-seqs; past it a request gets 429.")
@click.option("--allow-guard-override", is_flag=True,
              help="Let a request weaken the guard through its 'oc_engine' settings (turn it off, drop a check, "
                   "check less often). Without it a request can only make the guard stricter.")
@click.option("--audit-log", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per pause, verdict, block, fail-closed event and refused request.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@user_errors
def serve(model, backend, host, port, served_model_name, dtype, quantize, device, no_compile, max_num_seqs,
          max_model_len, trust_remote_code, probe_dir, no_guard, classifier_dir, warn, pause, every, alpha, api_key,
          max_waiting, allow_guard_override, audit_log, log_level, **fields):
    """Serve guarded generation over OpenAI's API (chat and completions, streamed or not).

    Every stream is guarded token by token: no text the probe held is sent before the
    classifier allows it, and a blocked answer ends with the refusal and
    finish_reason "content_filter". /health answers 503 until the model is loaded and
    warmed up; /metrics is Prometheus text.

    \b
    Examples:
      oc-engine serve                                  # the embedded model and its guard
      oc-engine serve --port 8001 --api-key s3cret --audit-log audit.jsonl
      uv run --project integrations/vllm oc-engine serve --backend vllm   # vLLM decodes
      curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from oc_engine.engine.embedded import EMBEDDED_MODEL_NAME
    from oc_engine.llm import DEFAULT, LLM
    from oc_engine.server import ServerConfig, run_server

    check_output_file(audit_log, "--audit-log")
    announce = progress_log("oc-engine")
    probe, guard = probe_and_guard(model, no_guard, probe_dir, classifier_dir, fields, announce, warn=warn,
                                   pause=pause, every=every, alpha=alpha)
    name = served_model_name or (EMBEDDED_MODEL_NAME if model is None else str(model))
    config = ServerConfig(model_name=name, api_key=api_key, max_waiting=max_waiting,
                          allow_guard_override=allow_guard_override, audit_log=audit_log)

    if backend == "vllm":
        make_llm = vllm_factory(model, probe, guard, classifier_dir, dtype=dtype, quantize=quantize, device=device,
                                no_compile=no_compile, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                trust_remote_code=trust_remote_code, probe_dir=probe_dir, log=announce)
    else:
        def make_llm():
            return LLM(model, probe=probe, classifier=classifier_dir or DEFAULT, guard=guard, dtype=dtype,
                       device=device, quantize=quantize, compile=not no_compile, max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, trust_remote_code=trust_remote_code, log=announce)

    guarded = "guarded" if probe is not None else "unguarded"
    announce(f"serving {name} on http://{host}:{port}/v1 ({guarded}, {backend} backend); "
             "/health answers 503 until the model is loaded and warmed up")
    run_server(config, make_llm, host=host, port=port, log_level=log_level)


def vllm_factory(model, probe, guard, classifier_dir, *, dtype, quantize, device, no_compile, max_num_seqs,
                 max_model_len, trust_remote_code, probe_dir, log):
    """`make_llm` for --backend vllm: a `VllmLLM` from the plugin's package (checked before the
    server starts, so a missing install or an option vLLM does not take is one line)."""
    from oc_engine.engine.defaults import resolve_probe_dir
    from oc_engine.errors import OcEngineError

    try:
        from oc_engine_vllm import VllmLLM
    except ImportError:
        raise OcEngineError("--backend vllm needs the vLLM plugin's environment: run `uv run --project "
                            "integrations/vllm oc-engine serve --backend vllm ...` (see docs/scale-out.md)") from None
    if quantize not in (None, "none"):
        raise OcEngineError("--quantize is the native engine's; with --backend vllm, give vLLM a quantized checkpoint")
    if device != "auto":
        raise OcEngineError("--device is the native engine's; vLLM runs on the platform it was installed for")
    directory = resolve_probe_dir(probe_dir, model is None) if probe is not None else None

    def make_llm():
        return VllmLLM(model, probe_dir=directory, probe=probe, classifier=classifier_dir or "default", guard=guard,
                       dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                       trust_remote_code=trust_remote_code, enforce_eager=no_compile, log=log)
    return make_llm
