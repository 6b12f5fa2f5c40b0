"""`oc-engine serve`: a guarded, OpenAI-compatible HTTP server (FastAPI + uvicorn).

    from oc_engine.server import ServerConfig, run_server
    run_server(ServerConfig(model_name="SmolLM2-135M-Instruct"), lambda: LLM(), port=8000)  # until SIGTERM

A front end like the CLI: it parses requests and calls an `Engine` (`oc_engine.engine.interface`); the
library never imports it. `app` builds the routes, `protocol` validates request bodies,
`responses` builds OpenAI objects, `guard_policy` decides what guard a request may ask for,
`metrics` and `audit` observe the engine's events.
"""

from __future__ import annotations

import signal
from typing import Callable

from oc_engine.engine.interface import Engine
from oc_engine.errors import OcEngineError
from oc_engine.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app", "run_server"]


def run_server(config: ServerConfig, make_llm: Callable[[], Engine], *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting connections, let the running requests
    finish, stop the engine, and return. Raises `OcEngineError` if the model could not be loaded
or the engine stopped on an error while serving (the command then exits non-zero)."""
    import socket

    import uvicorn

    from oc_engine.server.app import build_app

    # Bound before uvicorn starts: its lifespan (which starts loading the model) runs before it
    # binds, so a port in use would otherwise fail with the model half loaded on a thread.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise OcEngineError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    app = build_app(config, make_llm)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           # a backstop: the app answers past its own limit in JSON
                                           limit_concurrency=config.limit_concurrency + 64,
                                           timeout_keep_alive=config.keep_alive_s,
                                           timeout_graceful_shutdown=config.graceful_shutdown_s))
    state = app.state.oc
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    state.exiting = lambda: server.should_exit
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully; with these
    # handlers in place that is a no-op, so a graceful stop returns (and the command exits 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[listener])
    except SystemExit:  # uvicorn exits when it cannot serve; its log line said why
        raise OcEngineError(f"cannot serve on {host}:{port}") from None
    finally:
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.load_error:
        raise OcEngineError(f"the model could not be loaded: {state.load_error}")
    if state.fatal:
        raise OcEngineError(state.fatal)


def __getattr__(name: str):
    """`build_app` loads FastAPI: only when asked for (the CLI imports this package at start)."""
    if name == "build_app":
        from oc_engine.server.app import build_app

        return build_app
    raise AttributeError(f"module 'oc_engine.server' has no attribute {name!r}")
