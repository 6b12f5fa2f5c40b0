import pytest
import torch

from oc_engine.bench.decode import BENCH_PROMPT
from oc_engine.engine.prompts import render_prompt
from oc_engine.models.loading import load_model


def pytest_addoption(parser):
    parser.addoption("--bench-dtype", default="bfloat16", help="dtype for every decode benchmark")


@pytest.fixture(scope="session")
def embedded(request):
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model(None, device="cpu", dtype=request.config.getoption("--bench-dtype"), progress=False)
    return loaded, render_prompt(loaded.tokenizer, BENCH_PROMPT)
