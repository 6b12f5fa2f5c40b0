"""The decode step and its span attention with q written out before the loop over keys
(`shipped`) and without (`before`: inductor inlines q's RoPE into that loop).

    git worktree add /tmp/before caceb6e~1
    uv run python bench/results/runs/2026-12-08-span-attention-rope/attention_share.py \
        --rounds 3 --variant-tree /tmp/before

Each variant runs in its own process (`shipped`: this checkout; `before`: the tree given, put
first on PYTHONPATH), in turns. A process builds the embedded model's
16-slot bf16 engine with a 2,048-position cache (serve's defaults), warms it up, then times the
bare step (launch and read) with `rows` slots advancing at position `pos`, and profiles it with
inductor's per-kernel profiling on (its own inductor cache).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ((1, 200), (16, 100), (16, 200), (16, 600), (16, 1500))


def child() -> None:
    import torch
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True
    from torch.profiler import ProfilerActivity, profile
    from oc_engine import LLM
    from oc_engine.config import EngineConfig, UNGUARDED

    llm = LLM(config=EngineConfig(dtype="bfloat16", max_num_seqs=16), guard=UNGUARDED)
    llm.warm_up()
    runner = llm.engine.runner
    out = {}
    with torch.inference_mode():
        for rows, pos in CASES:
            for slot in range(16):
                runner.set_decoding(slot, slot < rows)
                if slot < rows:
                    runner._next_pos[slot] = pos
                else:
                    runner._next_pos.pop(slot, None)

            def step():
                runner.pos[:rows].fill_(pos)  # the same position every step
                runner.read(runner.launch(False)[0])
            for _ in range(5):
                step()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(10):
                    step()
                times.append((time.perf_counter() - start) / 10 * 1000)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    step()
            events = prof.key_averages()
            # Inductor's kernel that holds the softmax (at 16 rows: one per layer, attention with
            # the K/V write and RoPE; at one row it also holds fused matmul loops).
            attention = sum(e.self_cpu_time_total for e in events if "softmax" in e.key and e.key.startswith("graph_"))
            mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
            out[f"{rows}x{pos}"] = {"step_ms": round(statistics.median(times), 2),
                                    "attention_ms": round(attention / 1000 / 10, 2), "mm_ms": round(mm / 1000 / 10, 2)}
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant-tree", required=True)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child()
    for r in range(args.rounds):
        for name, tree in (("shipped", None), ("before", args.variant_tree)):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/attention-share-inductor-{name}"}
            if tree:
                env["PYTHONPATH"] = tree
            done = subprocess.run([sys.executable, __file__, "--child", "--variant-tree", "-"], env=env,
                                  capture_output=True, text=True)
            line = [l for l in done.stdout.splitlines() if l.startswith("{")]
            print(json.dumps({"round": r, "variant": name, **(json.loads(line[-1]) if line else {"error": done.stderr[-800:]})}),
                  flush=True)


if __name__ == "__main__":
    main()
