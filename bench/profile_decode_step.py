"""Where one compiled decode step's time goes, at batch 1 on the embedded model.

    uv run python bench/profile_decode_step.py --quantize int4 [--probe] [--steps 50]

Times the bare step (launch and read, the engine loop around it excluded) and prints torch
profiler's table of the operators inside it: the packed matmuls, attention's batched matmuls,
inductor's own kernels (under "Call CompiledFxGraph") and dynamo's guard evaluation ("Cache
Lookup"). What `bench decode --quantize` cannot show: why a step costs what it does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--probe", action="store_true", help="with a probe scored every step")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from oc_engine.bench.decode import BENCH_PROMPT, bench_llm, quiet_probe
    from oc_engine.engine.prompts import render_prompt
    from oc_engine.models.loading import load_model
    from oc_engine.params import SamplingParams

    loaded = load_model(None, dtype="bfloat16", quantize=args.quantize, progress=False)
    prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
    llm = bench_llm(loaded, prompt, 128, probe=quiet_probe(loaded) if args.probe else None)
    with torch.inference_mode():
        llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))  # compiles the step
        runner = llm.runner
        runner.set_decoding(0, True)

        def step():
            runner.pos.fill_(len(prompt))  # the same position every step: nothing runs past the cache
            handle, _ = runner.launch(False)
            runner.read(handle)

        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        bare_ms = (time.perf_counter() - start) / args.steps * 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print(json.dumps({"quantization": args.quantize, "probe": args.probe, "bare_step_ms": round(bare_ms, 2),
                      "per_step_ms": {e.key[:60]: round(e.self_cpu_time_total / 1000 / args.steps, 3)
                                      for e in rows}}, indent=2))


if __name__ == "__main__":
    main()
