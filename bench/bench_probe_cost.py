"""The probe's cost inside the compiled step, paired in time, at batch 1 on the embedded model.

    uv run python bench/bench_probe_cost.py [--quantize none|int8|int4] [--rounds 30]

Two engines over the same weights, one with a probe scored every token (never pausing), run
in alternating blocks of 20 bare steps (launch and read, as `profile_decode_step.py` times
them), then whole 128-token answers through `LLM.generate`. A shared CPU's speed drifts by
more than the probe costs, so the cost is the median of each round's ratio (the two engines
measured back to back), with its interquartile range, not a ratio of two medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--answers", type=int, default=6, help="rounds of whole answers")
    args = parser.parse_args()

    from oc_engine.bench.decode import BENCH_PROMPT, bench_llm, quiet_probe
    from oc_engine.engine.prompts import render_prompt
    from oc_engine.models.loading import load_model
    from oc_engine.params import SamplingParams

    loaded = load_model(None, dtype="bfloat16", quantize=args.quantize, progress=False)
    prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    llms = {"plain": bench_llm(loaded, prompt, 128), "probe": bench_llm(loaded, prompt, 128, probe=quiet_probe(loaded))}
    steps, bare, whole = {}, {name: [] for name in llms}, {name: [] for name in llms}
    with torch.inference_mode():
        for name, llm in llms.items():
            llm.generate([prompt], params)  # compiles the step
            runner = llm.runner
            runner.set_decoding(0, True)

            def step(runner=runner):
                runner.pos.fill_(len(prompt))  # the same position every step
                handle, _ = runner.launch(False)
                runner.read(handle)
            for _ in range(10):
                step()
            steps[name] = step
            runner.set_decoding(0, False)
        for _ in range(args.rounds):
            for name, step in steps.items():
                llms[name].runner.set_decoding(0, True)
                start = time.perf_counter()
                for _ in range(20):
                    step()
                bare[name].append((time.perf_counter() - start) / 20 * 1000)
                llms[name].runner.set_decoding(0, False)
    for _ in range(args.answers):
        for name, llm in llms.items():
            start = time.perf_counter()
            llm.generate([prompt], params)
            whole[name].append((time.perf_counter() - start) / 128 * 1000)

    def paired(times):
        ratios = sorted(p / q for p, q in zip(times["probe"], times["plain"]))
        quarter = len(ratios) // 4
        return {"cost": round(statistics.median(ratios) - 1, 4),
                "iqr": [round(ratios[quarter] - 1, 4), round(ratios[-1 - quarter] - 1, 4)],
                "ms": {name: round(statistics.median(v), 2) for name, v in times.items()}}
    print(json.dumps({"quantization": args.quantize, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "bare_step": paired(bare), "generate_per_token": paired(whole)}, indent=2))


if __name__ == "__main__":
    main()
