"""The guard console: a page at `/` that chats through the server's own API and draws the
guard at work (the probe's score and EMA per token, pauses, verdicts, blocks) as tokens arrive.

Static HTML, CSS and JS in `static/`, no build step and nothing fetched from elsewhere. The
page itself holds no data: everything it shows comes through `/console/settings`, `/metrics`
and `/v1/chat/completions`, each behind the API key when one is set (the page asks for it and
keeps it in the tab's session storage). Its trace uses the `oc_engine.trace` stream option,
which only a server started with `--guard-details` grants; without it the page shows the chat,
the blocks and the server's state, and says why the trace is missing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
SETTINGS_PATH = "/console/settings"
# The page runs only its own files, talks only to this server, and cannot be framed: a script
# injected through a model's answer (which the page writes as text, never as HTML) could not
# load or send anything anyway.
HEADERS = {"content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                      "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'",
           "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-cache"}


def add_console(app: FastAPI, state) -> None:
    """Routes of the console on `app` (`state`: the server's `ServerState`)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")

    @app.get(SETTINGS_PATH, include_in_schema=False)
    async def settings():
        """What the page needs to know of this server (behind the API key, like /v1)."""
        reason = state.unavailable()
        if reason is not None:
            return JSONResponse({"error": {"message": reason, "type": "service_unavailable", "param": None,
                                           "code": None}}, status_code=503)
        config, llm = state.config, state.llm
        body = {"model": config.model_name, "guarded": llm.guard_config is not None,
                "guard_details": config.guard_details, "metrics_public": config.metrics_public,
                "max_tokens": config.max_tokens_limit, "max_model_len": llm.max_model_len}
        probe = llm.probe
        if config.guard_details and probe is not None:  # the thresholds are a guard detail too
            body["thresholds"] = {"warn": probe.config.warn, "pause": probe.config.pause}
        return body
