"""`oc-engine serve --backend vllm` when vLLM's engine core dies (killed, as the OOM killer
would): the stream in flight ends with an error in OpenAI's format, and the server exits 1 so
that a supervisor restarts it, as the native server does when its engine thread dies."""

import json
import os
import signal
from pathlib import Path

import httpx

from conftest import start_vllm_server


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _engine_core(pid: int) -> int:
    for child in _children(pid):
        if "EngineCore" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace") + \
                Path(f"/proc/{child}/comm").read_text():
            return child
    raise AssertionError(f"no EngineCore process under {pid}")


def test_a_dead_engine_core_errors_the_stream_and_the_server_exits_1(tmp_path):
    log = tmp_path / "serve.log"
    process, base = start_vllm_server(["--max-num-seqs", "2", "--no-guard"], log)
    try:
        body = {"messages": [{"role": "user", "content": "Count to one thousand."}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(_engine_core(process.pid), signal.SIGKILL)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert "error" in json.loads(rest[-2]), rest[-3:]
        assert process.wait(120) == 1, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "the engine stopped" in log.read_text()
