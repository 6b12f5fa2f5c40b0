"""30 layers of RMSNorm -> 3072x576 GEMV at 1-16 rows: the multiply-and-sum (input written out)
against F.linear (oneDNN). uv run python rows_micro.py"""
import time

import torch

from oc_engine.engine.accel import materialized
from oc_engine.engine.runners.fused_llama import rms_norm

torch.manual_seed(0)
dtype = torch.bfloat16
L = 30
torch.set_num_threads(2)
layers = [(torch.randn(3072, 576, dtype=dtype) * 0.05, torch.randn(576, dtype=dtype)) for _ in range(L)]
def make(form):
    def step(x):
        acc = 0
        for w, n in layers:
            h = rms_norm(x, n, 1e-5)
            if form == "mulsum":
                h = materialized(h)
                out = (h.unsqueeze(-2).float() * w.float()).sum(-1).to(h.dtype)
            else:
                out = torch.nn.functional.linear(h, w)
            acc = acc + out[:, :8].float().sum()
        return acc
    return step
for rows in (1, 2, 4, 8, 16):
    x = torch.randn(rows, 576, dtype=dtype)
    res = {}
    for form in ("mulsum", "linear"):
        torch._dynamo.reset()
        f = torch.compile(make(form), fullgraph=True)
        for _ in range(3): f(x)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(10): f(x)
            ts.append((time.perf_counter() - t) / 10 * 1e3)
        res[form] = round(sorted(ts)[3], 2)
    print(rows, res, flush=True)
