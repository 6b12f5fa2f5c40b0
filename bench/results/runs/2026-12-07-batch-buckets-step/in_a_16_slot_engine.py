import time, collections
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.llm import LLM
from oc_engine.params import SamplingParams
for buckets in [(1, 4), ()]:
    llm = LLM(None, EngineConfig(dtype="bfloat16", max_num_seqs=16, batch_buckets=buckets), UNGUARDED)
    llm.warm_up()
    seen = collections.Counter(); launch = llm.runner.launch
    def spy(s, keep_taps=False, launch=launch, llm=llm):
        seen[llm.runner.bucket(s)] += 1; return launch(s, keep_taps)
    llm.runner.launch = spy
    p = SamplingParams(max_tokens=96, ignore_eos=True)
    for n in (1, 4, 16):
        t = time.time(); llm.generate(["Tell me a story about a dragon."] * n, p); dt = time.time() - t
        print(buckets, n, "ms/step", round(dt / 96 * 1000, 1), "tok/s", round(n * 96 / dt, 1), dict(seen), flush=True); seen.clear()
    llm.close()
