"""`oc-engine serve`: options build a `ServerConfig` and an `LLM` factory; the server runs."""

from __future__ import annotations

import click

from oc_engine.cli.common import (check_output_file, engine_config, engine_options, guard_options, guard_setup,
                                  model_option, progress_log, user_errors)
from oc_engine.cli.config_file import config_option
from oc_engine.server.config import ServerConfig

LIMITS = ServerConfig(model_name="defaults")  # the CLI's limits are the library's defaults
# Chosen from the measured curve (bench/results/cpu-serve-as-a-client-sees-it-2026-12-07.md, item 5).
SERVE_SLOTS = 16
SERVE_SLOTS_HELP = (
    "Requests decoded together (cache slots); more wait for a free one. Each costs compute every step. "
    "16 by default, from the curve measured on a 2-core CPU in bf16: for 16 clients 16 slots gave 343 "
    "tokens/s with a 0.6 s median time to first token, 8 slots 245 and 4.6 s (queued), at a cost to one "
    "client of 17% (26 against 32 tokens/s). --dtype auto (bf16 where the CPU has it) was 1.3-1.8x fp32 "
    "at every load.")
# The options that map one to one onto `ServerConfig`'s fields.
SERVER_FIELDS = ("api_key", "max_waiting", "allow_guard_override", "audit_log", "audit_max_bytes", "audit_backups",
                 "audit_required", "guard_details", "max_body_bytes", "max_messages", "max_message_chars",
                 "max_stop_chars", "max_tokens_limit", "metrics_public", "limit_concurrency", "keep_alive_s",
                 "graceful_shutdown_s", "console")


@click.command()
@config_option(sections=("engine", "guard", "policy", "server"))
@model_option
@click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
              help="vllm: decode with vLLM (its scheduler, paged cache and parallelism) and guard here; needs the "
                   "plugin's environment: uv run --project integrations/vllm oc-engine serve --backend vllm.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None,
              help="The name clients send as 'model' [default: the model's name or path].")
@engine_options(max_num_seqs=SERVE_SLOTS, slots_help=SERVE_SLOTS_HELP)
@guard_options
@click.option("--api-key", envvar="OC_ENGINE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (or set OC_ENGINE_API_KEY).")
@click.option("--max-waiting", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests accepted beyond --max-num-seqs; past it a request gets 429.")
@click.option("--allow-guard-override", is_flag=True,
              help="Let a request weaken the guard through its 'oc_engine' settings (turn it off, drop a check, "
                   "check less often). Without it a request can only make the guard stricter.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=LIMITS.max_body_bytes, show_default=True,
              help="Larger request bodies get 413, before any work.")
@click.option("--max-messages", type=click.IntRange(min=1), default=LIMITS.max_messages, show_default=True,
              help="Messages per chat request (400 past it, before any templating).")
@click.option("--max-message-chars", type=click.IntRange(min=1), default=LIMITS.max_message_chars,
              show_default=True, help="Characters per message or prompt (400 past it, before tokenization).")
@click.option("--max-stop-chars", type=click.IntRange(min=1), default=LIMITS.max_stop_chars, show_default=True,
              help="Characters per stop sequence (at most 4 of them, as OpenAI's API).")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=None,
              help="The most tokens a request may ask for (400 past it), and what one that asks for none gets "
                   "[default: the rest of the model's context].")
@click.option("--metrics-public", is_flag=True,
              help="Serve /metrics without the API key (with --api-key it is behind the key by default).")
@click.option("--guard-details", is_flag=True,
              help="Send clients the guard's details: pause points, verdicts with p(unsafe), the reason, the tokens "
                   "generated, timings, and a stream chunk per pause and verdict. Without it a response depends "
                   "only on what was shown and whether the guard ended it (the metrics and audit log have all).")
@click.option("--audit-log", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per guard event (the prompt once per request) and refused request; "
                   "created 0600, never through a symlink.")
@click.option("--audit-max-bytes", type=click.IntRange(min=1), default=LIMITS.audit_max_bytes, show_default=True,
              help="Rotate the audit log past this size (FILE.1 is the newest old file).")
@click.option("--audit-backups", type=click.IntRange(min=0), default=LIMITS.audit_backups, show_default=True,
              help="Old audit log files kept.")
@click.option("--audit-required", is_flag=True,
              help="Fail closed on the audit log: once a write fails, no more guarded text is released and "
                   "/health answers 503.")
@click.option("--limit-concurrency", type=click.IntRange(min=1), default=LIMITS.limit_concurrency,
              show_default=True,
              help="Requests in progress (a stream until it ends) past which a new one gets 503 at once.")
@click.option("--keep-alive", "keep_alive_s", type=click.FloatRange(min=0, min_open=True),
              default=LIMITS.keep_alive_s, show_default=True, help="Seconds an idle connection stays open.")
@click.option("--graceful-shutdown", "graceful_shutdown_s", type=click.FloatRange(min=0, min_open=True),
              default=LIMITS.graceful_shutdown_s, show_default=True,
              help="After SIGTERM, seconds the running requests have to finish before they are cut.")
@click.option("--console/--no-console", default=True, show_default=True,
              help="The guard console at http://HOST:PORT/: a chat that draws each answer's risk live (the "
                   "probe's score per token, pauses, verdicts, blocks) and the server's state. It uses the API "
                   "(behind --api-key, which the page asks for); its trace needs --guard-details.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@user_errors
def serve(model, backend, host, port, served_model_name, log_level, **fields):
    """Serve guarded generation over OpenAI's API (chat and completions, streamed or not).

    Every stream is guarded token by token: no text the probe held is sent before the
    classifier allows it, and a blocked answer ends with the refusal and
    finish_reason "content_filter". /health answers 503 until the model is loaded and
    warmed up; /metrics is Prometheus text; / is the guard console (open it in a browser).

    \b
    Examples:
      oc-engine serve                                  # the embedded model and its guard
      oc-engine serve --guard-details                  # ... and the console's live risk trace
      oc-engine serve --port 8001 --api-key s3cret --audit-log audit.jsonl
      uv run --project integrations/vllm oc-engine serve --backend vllm   # vLLM decodes
      curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from oc_engine.llm import LLM
    from oc_engine.models.embedded import EMBEDDED_MODEL_NAME
    from oc_engine.server import run_server

    check_output_file(fields["audit_log"], "--audit-log")
    announce = progress_log("oc-engine")
    name = served_model_name or (EMBEDDED_MODEL_NAME if model is None else str(model))
    server_config = ServerConfig(model_name=name, **{f: fields.pop(f) for f in SERVER_FIELDS})
    config = engine_config(fields)
    setup = guard_setup(model, fields, announce)
    if backend == "vllm":
        make_llm = vllm_factory(model, config, setup, log=announce)
    else:
        def make_llm():
            return LLM(model, config, setup, log=announce)

    guarded = "guarded" if setup.probe is not None else "unguarded"
    console = f"; the guard console is at http://{host}:{port}/" if server_config.console else ""
    announce(f"serving {name} on http://{host}:{port}/v1 ({guarded}, {backend} backend); "
             f"/health answers 503 until the model is loaded and warmed up{console}")
    run_server(server_config, make_llm, host=host, port=port, log_level=log_level)


def vllm_factory(model, config, setup, *, log):
    """`make_llm` for --backend vllm: a `VllmLLM` from the plugin's package (checked before the
    server starts, so a missing install or an option vLLM does not take is one line)."""
    from oc_engine.errors import OcEngineError

    try:
        from oc_engine_vllm import VllmLLM
    except ImportError:
        raise OcEngineError("--backend vllm needs the vLLM plugin's environment: run `uv run --project "
                            "integrations/vllm oc-engine serve --backend vllm ...` (see docs/scale-out.md)") from None
    VllmLLM.check_config(config)

    def make_llm():
        return VllmLLM(model, config, setup, log=log)
    return make_llm
