import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before
# any kernel is defined (at import). Inductor's CPU code is C++, so nothing else changes.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, torch.get_num_threads()))

from tiny_models import tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    """tiny(family, dtype=fp32) -> LoadedModel, built once per (family, dtype)."""
    built = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        if (family, dtype) not in built:
            built[family, dtype] = tiny_model(family, dtype)
        return built[family, dtype]

    return get


@pytest.fixture(scope="session")
def embedded_fp32():
    """The embedded SmolLM2-135M-Instruct in fp32 (converted to the user cache on first use)."""
    from oc_engine.engine.loading import load_model

    return load_model(None, device="cpu", dtype="float32", progress=False)


def hf_greedy(loaded, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face generate, greedy, fixed length: the reference for token equality."""
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                    min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
