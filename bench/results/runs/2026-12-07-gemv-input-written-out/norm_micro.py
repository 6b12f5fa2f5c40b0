"""30 layers of a 3072x576 one-row GEMV, its input an RMSNorm: inlined into the loop or written
out first (as_strided). uv run python norm_micro.py {int8|none}"""
import sys
import time

import torch

from oc_engine.engine.runners.fused_llama import rms_norm
from oc_engine.models.quantize import QuantizedLinear

torch.manual_seed(0)
dtype = torch.bfloat16
scheme = sys.argv[1]
torch.set_num_threads(2)
layers = [(QuantizedLinear.from_weight(torch.randn(3072, 576, dtype=dtype) * 0.05, scheme) if scheme != "none"
           else torch.randn(3072, 576, dtype=dtype) * 0.05, torch.randn(576, dtype=dtype)) for _ in range(30)]


def gemv(h, w):
    if scheme == "none":
        return (h.unsqueeze(-2).float() * w.float()).sum(-1).to(h.dtype)
    return ((h.float()[:, None, :] * w.data.float()).sum(-1) * w.scales.float()).to(h.dtype)


def make(norm: bool, written_out: bool):
    def step(x):
        acc = 0
        for w, n in layers:
            h = rms_norm(x, n, 1e-5) if norm else x
            if written_out:
                h = torch.as_strided(h, h.shape, h.stride())
            acc = acc + gemv(h, w)[:, :8].float().sum()
        return acc
    return step


x = torch.randn(1, 576, dtype=dtype)
for name, norm, written_out in [("graph input", False, False), ("RMSNorm inlined", True, False),
                                ("RMSNorm written out", True, True), ("RMSNorm inlined", True, False)]:
    torch._dynamo.reset()
    f = torch.compile(make(norm, written_out), fullgraph=True)
    for _ in range(5):
        f(x)
    times = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(20):
            f(x)
        times.append((time.perf_counter() - start) / 20 * 1e3)
    print(scheme, name, round(sorted(times)[4], 2), "ms", flush=True)
