"""The compiled decode step, two variants, each in its own process, on the embedded model.

    uv run python bench/bench_step_ab.py [--compare input|int8|probe] [--quantize none|int8|int4]
                                         [--slots 1] [--rounds 4]

--compare input: as shipped, `fused_llama.linear` passes its input through
`accel.materialized` before the multiply-and-sum; before, that call was the identity, so
inductor inlined the RMSNorm or SiLU(gate) * up producing the input into the loop.
--compare int8: as shipped, one row of an int8 layer is `quantize.int8_gemv`; before, aten's
`_weight_int8pack_mm` (use with --quantize int8 or int4, whose head is int8).
--compare probe: "shipped" scores a probe every token (never pausing), "before" has none: the
probe's cost.

Each variant runs in its own process, in turns, `--rounds` times. The "before" variants swap
a module global that the step reads when it is traced, and dynamo guards on it: two engines
in one process cannot each keep their own (putting the global back recompiled the first
engine with the shipped code, and both then ran alike). Each process times 128-token answers
through `LLM.generate` (median of 3, after one that compiles); the result is the median of
each round's ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("before", "shipped")


def child(compare: str, variant: str, quantize: str, slots: int) -> None:
    import torch

    from oc_engine.bench.decode import BENCH_PROMPT, bench_llm, quiet_probe
    from oc_engine.engine.prompts import render_prompt
    from oc_engine.engine.runners import fused_llama
    from oc_engine.models import quantize as quantize_module
    from oc_engine.models.loading import load_model
    from oc_engine.params import SamplingParams

    if variant == "before" and compare == "input":
        fused_llama.materialized = lambda x: x  # read when the step is traced
    if variant == "before" and compare == "int8":
        quantize_module.int8_gemv = lambda x, data, scales: torch.ops.aten._weight_int8pack_mm(x, data, scales)
    loaded = load_model(None, dtype="bfloat16", quantize=quantize, progress=False)
    prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    probe = quiet_probe(loaded) if variant == "shipped" and compare == "probe" else None
    llm = bench_llm(loaded, prompt, 128, slots=slots, probe=probe)
    tokens = llm.generate([prompt], params)[0].token_ids  # compiles the step
    times = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate([prompt], params)
        times.append((time.perf_counter() - start) / 128 * 1000)
    print(json.dumps({"ms_per_token": statistics.median(times), "tokens": list(tokens)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=["input", "int8", "probe"], default="input")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--slots", type=int, default=1, help="the engine's slots (rows of each GEMV)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.compare, args.child, args.quantize, args.slots)
    if args.compare == "int8" and args.quantize == "none":
        parser.error("--compare int8 needs --quantize int8 or int4 (an unquantized model has no int8 layer)")
    import torch

    runs = {variant: [] for variant in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--compare", args.compare,
                                  "--quantize", args.quantize, "--slots", str(args.slots)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the {variant} process failed:\n{out.stderr[-2000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}/{args.rounds} {variant}: {runs[variant][-1]['ms_per_token']:.2f} ms/token",
                  file=sys.stderr, flush=True)
    ms = {variant: [r["ms_per_token"] for r in rows] for variant, rows in runs.items()}
    ratios = sorted(s / b for s, b in zip(ms["shipped"], ms["before"]))
    print(json.dumps({"compare": args.compare, "quantization": args.quantize, "slots": args.slots,
                      "rounds": args.rounds,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "ms_per_token": {variant: [round(v, 2) for v in values] for variant, values in ms.items()},
                      "time_ratio": round(statistics.median(ratios), 3),
                      "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
                      "same_tokens": runs["before"][0]["tokens"] == runs["shipped"][0]["tokens"]}, indent=2))


if __name__ == "__main__":
    main()
