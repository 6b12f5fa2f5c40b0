# One request's decode rate: bucket 1 of a 16-slot engine against engines of one slot, two cache lengths.
import time
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.llm import LLM
from oc_engine.params import SamplingParams
p = SamplingParams(max_tokens=128, ignore_eos=True)
llms = {}
for slots, length in [(16, 2048), (1, 2048)]:
    llm = LLM(None, EngineConfig(dtype="bfloat16", max_num_seqs=slots, max_model_len=length, batch_buckets=(1,)), UNGUARDED)
    llm.warm_up(); llms[slots, length] = llm
rates = {k: [] for k in llms}
for r in range(4):  # round-robin: the machine drifts
    for k, llm in llms.items():
        t = time.time(); llm.generate(["Tell me a story about a dragon."], p); rates[k].append(128 / (time.time() - t))
for (slots, length), rs in rates.items():
    print(f"slots {slots:2d} cache {length}: one request {sorted(rs)[len(rs) // 2]:.1f} tok/s (rounds {', '.join(f'{x:.1f}' for x in rs)})", flush=True)
