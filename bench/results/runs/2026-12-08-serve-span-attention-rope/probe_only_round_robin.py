"""Servers of the given kinds started in turns, `rounds` times; 16 clients x 32 requests each
(the bench serve load, from the openai client in its own process). Usage: KINDS ROUNDS."""
import asyncio, json, sys
from pathlib import Path
from oc_engine.bench import serve as S
from oc_engine.models.loading import resolve_model_source
weights = str(resolve_model_source(None))
prompts = S.jbb_prompts(Path("../shared/data"), "benign")
kinds = sys.argv[1].split(","); rounds = int(sys.argv[2])
for r in range(rounds):
    for kind in kinds:
        port = S.free_port()
        log = Path(f"/tmp/exp/srv-{kind}.log")
        proc = S.start_server(S.server_command(kind, port, weights, "bfloat16", 16), log)
        base = f"http://127.0.0.1:{port}"
        try:
            S.wait_healthy(base, proc, log)
            model = S.served_model(base)
            asyncio.run(S.run_load(base, model, prompts, 16, 16, 8))
            run = S.run_client_process(base, model, prompts, 16, 32, 128)
            print(r, kind, json.dumps({k: run[k] for k in run if any(w in k for w in ("tokens_per_s", "gap", "finish"))}), flush=True)
        finally:
            S.stop_server(proc)
