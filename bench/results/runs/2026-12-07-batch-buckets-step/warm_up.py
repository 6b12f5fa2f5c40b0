import sys, time
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.llm import LLM
buckets = tuple(int(x) for x in sys.argv[1].split(",") if x)
t0 = time.time()
llm = LLM(None, EngineConfig(dtype="bfloat16", max_num_seqs=16, batch_buckets=buckets), UNGUARDED)
t1 = time.time()
last = 0.0
for b in llm.runner.buckets:
    for sampled in (False, True):
        s = time.time(); llm.runner._run_step(sampled, b); print("bucket", b, "sampled" if sampled else "greedy", round(time.time() - s, 1), "s", flush=True)
print("buckets", llm.runner.buckets, "load", round(t1 - t0, 1), "compile total", round(llm.runner.compile_s, 1), flush=True)
