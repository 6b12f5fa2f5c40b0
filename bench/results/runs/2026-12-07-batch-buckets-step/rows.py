import sys, time
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.llm import LLM
from oc_engine.params import SamplingParams
for b in [int(x) for x in sys.argv[1:]]:
    llm = LLM(None, EngineConfig(dtype="bfloat16", max_num_seqs=b, max_model_len=512), UNGUARDED)
    t = time.time(); llm.warm_up(); w = time.time() - t
    p = SamplingParams(max_tokens=96, ignore_eos=True)
    ms = []
    for r in range(3):
        t = time.time(); llm.generate(["Tell me a story about a dragon."] * b, p); ms.append((time.time() - t) / 96 * 1000)
    print(b, "warm", round(w, 1), "ms/step", round(sorted(ms)[1], 2), "tok/s", round(b * 1000 / sorted(ms)[1], 1), flush=True)
    llm.close()
