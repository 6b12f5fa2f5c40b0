"""The one script a GPU run needs: correctness and speed of the CUDA paths, in one call.

    TRITON_INTERPRET=0 python bench/gpu/check.py --out "$OUT"          # on the device, from the repo root
    TRITON_INTERPRET=1 python bench/gpu/check.py --out /tmp/c --tiny   # on CPU, tiny sizes (a test runs this)

Runs from the repository root without installing (torch, triton and transformers are enough):
models are random-initialised from configs shaped like the real ones (speed does not depend on
the weights' values) with a word-level tokenizer, and the classifier is a random
MiniLM-shaped PyTorch model on its own CUDA stream. `check.json` is rewritten after every
section, so a run cut short still reports what it finished; a section that fails records its
error and the next one runs. Sections:
0. versions and the device;
1. the Triton probe+EMA kernel against its reference (layers, batch, hidden, bf16 and fp32, six
   EMA steps, a strided input) and its time;
2. fp32, TF32 off, a small model: Hugging Face `generate`, the eager engine and the compiled
   engine with output lag 0, 1 and 2 make the same greedy tokens; a batch equals each request
   alone, also in a warmed engine's batch buckets (2, then 1: a CUDA graph each, the probe's
   EMA updated through a view); the probe's EMAs match eager; a state reader's checks in the compiled engine match
   the reader applied to Hugging Face's hidden states; cudagraph skips and recompiles after warm-up;
3. bf16 speed at batch 1 for SmolLM2-135M, Llama-3.2-1B and Qwen3-1.7B shapes: Hugging Face
   `generate`, engine eager, compiled, compiled with the probe; ms/token and achieved GB/s
   (weights and K/V read per token) against the H200's 4.8 TB/s;
4. the guard: escalations forced as in `oc-engine bench guard`, the classifier beside
   decoding: tokens/s against unguarded and the largest gap while a check is pending;
5. int8 and int4 weight-only decode (`--quantize`): the kernels against their reference, tokens
   against Hugging Face on the same quantized model, bf16 speed with and without the probe.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # the H200's memory bandwidth
SHAPES = {  # the real models' dimensions (their config.json)
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True),
    "qwen3-1.7b": dict(family="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
}
TINY_SHAPE = dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False)


class Report:
    """check.json, rewritten (atomically) after every section."""

    def __init__(self, out: Path):
        self.path = out / "check.json"
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sections": {}}

    def run(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        print(f"check: {name} ...", file=sys.stderr, flush=True)
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - record it; the next section still runs
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.data["sections"][name] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# -- building blocks ----------------------------------------------------------------------
def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w2", eos_token="w1", pad_token="w0",
                                   unk_token="w3")


def random_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A LoadedModel: a random model with these dimensions, and a tokenizer to match."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from oc_engine.models.loading import LoadedModel

    fields = {k: v for k, v in shape.items() if k != "family"}
    config_class = Qwen3Config if shape["family"] == "qwen3" else LlamaConfig
    config = config_class(max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)  # wider than the default init: greedy decoding has clear winners
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=word_tokenizer(config.vocab_size), source=f"random:{shape}",
                       device=device, dtype=dtype)


def fixed(n: int, **kwargs):
    from oc_engine.params import SamplingParams

    return SamplingParams(max_tokens=n, ignore_eos=True, **kwargs)


def elapsed_us(fn, device: torch.device, iterations: int) -> float:
    fn()  # warm-up (compiles the kernel)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations * 1e6


# -- sections -----------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def kernel(device: torch.device, tiny: bool) -> dict:
    from oc_engine.kernels.probe_ema import probe_ema_reference, probe_ema_triton

    rows, worst = [], 0.0
    for layers in (1, 4):
        for batch in ((1, 8) if tiny else (1, 8, 64)):
            for hidden in ((64,) if tiny else (576, 4096, 8192)):
                for dtype in (torch.bfloat16, torch.float32):
                    g = torch.Generator(device="cpu").manual_seed(layers * 1000 + batch * 10 + hidden)
                    # Strided: each row is a view into a wider buffer, as the step's tapped states are.
                    wide = torch.randn(layers, batch, hidden + 32, generator=g).to(device, dtype)
                    states = wide[:, :, :hidden]
                    weight = (torch.randn(layers, hidden, generator=g) * 0.02).to(device)
                    bias = torch.zeros(1, device=device)
                    thresholds = torch.tensor([0.3, 0.5, 0.7], device=device)
                    ema_k = torch.full((batch,), -1.0, device=device)
                    ema_r = ema_k.clone()
                    match = True
                    for _ in range(6):
                        score_k, flags_k = probe_ema_triton(states, weight, bias, ema_k, thresholds)
                        score_r, flags_r = probe_ema_reference(states, weight, bias, ema_r, thresholds)
                        diff = max((score_k - score_r).abs().max().item(), (ema_k - ema_r).abs().max().item())
                        worst = max(worst, diff)
                        match &= diff < 1e-4 and torch.equal(flags_k, flags_r)
                    us = elapsed_us(lambda: probe_ema_triton(states, weight, bias, ema_k.clone(), thresholds),
                                    device, 3 if device.type != "cuda" else 200)
                    rows.append({"layers": layers, "batch": batch, "hidden": hidden,
                                 "dtype": str(dtype).removeprefix("torch."), "match": match,
                                 "max_abs_diff": diff, "us": round(us, 2)})
    return {"all_match": all(r["match"] for r in rows), "max_abs_diff": worst, "rows": rows}


def correctness(device: torch.device, tiny: bool) -> dict:
    import torch._dynamo

    from oc_engine.bench.decode import quiet_probe
    from oc_engine.config import DebugOptions, EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shape = TINY_SHAPE if tiny else dict(TINY_SHAPE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=2048)
    loaded = random_model(shape, torch.float32, device)
    new = 12 if tiny else 48
    prompt, other = [2, 17, 99, 45, 300, 12], [2, 5, 6, 7, 8, 9, 10, 11]
    ids = torch.tensor([prompt], device=device)
    hf = loaded.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()

    def engine(compile: bool, lag: int | None = None, probe=None):
        return LLM(loaded, EngineConfig(compile=compile, max_num_seqs=2, max_model_len=128),
                   GuardSetup(probe=probe, classifier=None), debug=DebugOptions(output_lag=lag))

    out: dict = {"hf_generate": hf}
    out["eager_equals_hf"] = list(engine(False).generate([prompt], fixed(new))[0].token_ids) == hf
    counters = torch._dynamo.utils.counters
    for lag in (0, 1, 2):
        llm = engine(True, lag)
        tokens = list(llm.generate([prompt], fixed(new))[0].token_ids)
        before = counters["stats"]["unique_graphs"]
        both = llm.generate([prompt, other], [fixed(new), fixed(new // 2)])
        alone = list(llm.generate([other], fixed(new // 2))[0].token_ids)
        out[f"compiled_lag{lag}"] = {"equals_hf": tokens == hf, "batch_equals_alone":
                                     list(both[0].token_ids) == hf and list(both[1].token_ids) == alone,
                                     "recompiles_after_warmup": counters["stats"]["unique_graphs"] - before}
    # Batch buckets: after warm-up the two answers run in bucket 2, then the longer one alone in
    # bucket 1 (each its own CUDA graph), the probe's EMA updated through a view of its rows.
    probe = quiet_probe(loaded)
    llm = LLM(loaded, EngineConfig(compile=True, max_num_seqs=2, max_model_len=128, batch_buckets=(1,)),
              GuardSetup(probe=probe, classifier=None))
    llm.warm_up()
    before = counters["stats"]["unique_graphs"]
    bucketed = llm.generate([prompt, other], [fixed(new), fixed(new // 2)])
    out["compiled_buckets"] = {"equals_hf": list(bucketed[0].token_ids) == hf,
                               "batch_equals_alone": list(bucketed[1].token_ids) == alone,
                               "recompiles_after_warmup": counters["stats"]["unique_graphs"] - before}
    emas = [engine(c, probe=probe).run([prompt], fixed(new))[0].emas for c in (False, True)]
    out["probe_ema_max_diff"] = max(abs(a - b) for a, b in zip(*emas))
    out["state_reader_max_diff"] = state_reader_parity(loaded, prompt, new, probe)
    out["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
    out["ok"] = bool(out["eager_equals_hf"] and out["probe_ema_max_diff"] < 1e-4
                     and out["state_reader_max_diff"] < 1e-3 and all(
        v["equals_hf"] and v["batch_equals_alone"] and v["recompiles_after_warmup"] == 0
        for k, v in out.items() if k.startswith("compiled_")) and not out["cudagraph_skips"])
    return out


def state_reader_parity(loaded, prompt: list[int], new: int, quiet) -> float:
    """The largest |p_unsafe| difference between each check of a state reader (random weights, a
    probe that pauses at every token) in the compiled engine with the output lag of this device,
    and the same reader applied to Hugging Face's own hidden states of the tokens it covered."""
    import dataclasses

    import numpy as np

    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.pooled_states import pool
    from oc_engine.guard.probe import ModelFingerprint, Probe
    from oc_engine.guard.state_reader import ReaderConfig, StateReader
    from oc_engine.llm import LLM

    fingerprint = ModelFingerprint.of(loaded.model)
    taps = tuple(t % (fingerprint.num_layers + 1) for t in quiet.config.layers)
    pausing = Probe(config=dataclasses.replace(quiet.config, layers=taps, warn=0.0, pause=0.0), weight=quiet.weight,
                    bias=torch.ones(1))
    config = ReaderConfig(model=fingerprint, layers=taps, hidden_size=fingerprint.hidden_size,
                          labels=("safe_compliance", "safe_refusal", "unsafe_compliance"), unsafe_label=2,
                          allow_threshold=1.0, block_threshold=1.0)
    rng = np.random.default_rng(0)
    size, width = config.feature_size, 16
    reader = StateReader(".", config, {"mean": np.zeros(size, np.float32), "scale": np.ones(size, np.float32),
                                       "w1": rng.normal(0, 0.05, (width, size)).astype(np.float32),
                                       "b1": np.zeros(width, np.float32),
                                       "w2": rng.normal(0, 1, (3, width)).astype(np.float32),
                                       "b2": np.zeros(3, np.float32)})
    llm = LLM(loaded, EngineConfig(compile=True, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=pausing, classifier=reader))
    seq = llm.run([prompt], fixed(new))[0]
    ids = torch.tensor([seq.prompt_ids + seq.token_ids], device=loaded.device)
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states
    start = len(seq.prompt_ids) - 1  # row j: the state that produced answer token j
    rows = torch.stack([hidden[t][0, start:start + len(seq.token_ids)] for t in taps], 1).float().cpu().numpy()
    verdicts = seq.completion.guard.verdicts
    if not verdicts:
        raise RuntimeError("the pausing probe asked the state reader nothing")
    return max(abs(v.p_unsafe - reader.judge_features(pool(rows[:v.covers]))["p_unsafe"]) for v in verdicts)


def speed(device: torch.device, tiny: bool) -> dict:
    from oc_engine.bench.decode import MODES, bench_mode

    shapes = {"tiny": TINY_SHAPE} if tiny else SHAPES
    new, repeats = (8, 1) if tiny else (256, 3)
    modes = [m for m in MODES if m != "no_kv_cache"] + ["engine_compiled_probe"]
    out = {}
    for name, shape in shapes.items():
        loaded = random_model(shape, torch.bfloat16, device)
        prompt = [2] + [5 + i for i in range(31)]
        rows = {}
        for mode in modes:
            r = bench_mode(mode, loaded, prompt, new, repeats)
            rows[mode] = {"tokens_per_s": round(r.tokens_per_s, 1), "ms_per_token": round(r.ms_per_token, 3)}
        per_token = bytes_per_token(loaded.model, len(prompt) + new // 2)
        hf = rows["hf_generate"]["tokens_per_s"]
        for row in rows.values():
            row["x_hf_generate"] = round(row["tokens_per_s"] / hf, 2)
            row["gb_per_s"] = round(per_token * row["tokens_per_s"] / 1e9, 1)
            row["roofline_fraction"] = round(per_token * row["tokens_per_s"] / HBM_BYTES_PER_S, 3)
        probe_cost = 1 - rows["engine_compiled_probe"]["tokens_per_s"] / rows["engine_compiled"]["tokens_per_s"]
        out[name] = {"bytes_per_token": per_token, "modes": rows, "probe_share_of_step": round(probe_cost, 4)}
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bytes_per_token(model, context: int) -> int:
    """Weights read per token (the input embedding reads one row, unless it is also the head)
    plus the K/V read at `context` positions."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    tied = embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        weights -= embedding.numel() * embedding.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * context * embedding.element_size()
    return int(weights + kv)


class RandomClassifier:
    """A random MiniLM-shaped classifier beside decoding: a worker thread, its own CUDA stream.
    It answers allow (the guard bench forces allows, so every answer runs to its end)."""

    def __init__(self, device: torch.device, tiny: bool):
        from transformers import BertConfig, BertForSequenceClassification

        size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64) if tiny \
            else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        self.model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2, **size)).to(device).eval()
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = cf.ThreadPoolExecutor(max_workers=1)

    def submit(self, prompt: str, response: str, urgent: bool = False, judged_chars: int = 0) -> cf.Future:
        words = (prompt + " " + response).split()[:128]
        ids = torch.tensor([[hash(w) % 30522 for w in words] or [0]])
        return self.pool.submit(self._run, ids)

    def _run(self, ids: torch.Tensor) -> dict:
        with torch.inference_mode():
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    logits = self.model(ids.pin_memory().to(self.device, non_blocking=True)).logits.float()
                self.stream.synchronize()
            else:
                logits = self.model(ids).logits.float()
        return {"verdict": "allow", "p_unsafe": float(logits.softmax(-1)[0, 1])}


def guard(device: torch.device, tiny: bool) -> dict:
    from oc_engine.bench.decode import bench_llm, quiet_probe
    from oc_engine.bench.guard import TimedClassifier, escalating_probe, gap_stats
    from oc_engine.guard.policy import GuardConfig

    loaded = random_model(TINY_SHAPE if tiny else SHAPES["smollm2-135m"], torch.bfloat16, device)
    prompt, new, rounds = [2] + [5 + i for i in range(31)], (24 if tiny else 128), (1 if tiny else 3)
    plain = bench_llm(loaded, prompt, new)
    probed = bench_llm(loaded, prompt, new, probe=quiet_probe(loaded), guard=GuardConfig(max_held=64))
    probed.set_probe(escalating_probe(loaded, probed, prompt, new, 0.9))
    classifier = RandomClassifier(device, tiny)

    def run(llm, timed):
        if timed is not None:
            llm.classifier = timed
        seq = llm.run([prompt], fixed(new))[0]
        arrivals = seq.token_times
        row = {"tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
               **gap_stats(arrivals, timed.intervals if timed else [])}
        if timed is not None:
            row["checks"] = len(seq.completion.guard.verdicts)
        return row

    run(plain, None)  # warm-up both
    run(probed, TimedClassifier(classifier, blocking=False))
    rows = {"unguarded": [], "escalating": []}
    for _ in range(rounds):  # round-robin: a slow spell hits both
        rows["unguarded"].append(run(plain, None))
        rows["escalating"].append(run(probed, TimedClassifier(classifier, blocking=False)))
    ratios = [g["tokens_per_s"] / u["tokens_per_s"] for g, u in zip(rows["escalating"], rows["unguarded"])]
    worst = max((r["max_gap_during_check_ms"] or 0) / r["median_gap_ms"] for r in rows["escalating"])
    return {"escalating_x_unguarded": round(statistics.median(ratios), 3),
            "max_gap_during_check_over_median": round(worst, 2), "runs": rows}


def quantized(device: torch.device, tiny: bool) -> dict:
    """int8 and int4 weight-only: each packed kernel against its dequantized reference; the engine
    against Hugging Face `generate` on the same quantized model (bf16: closeness, as the prompt
    and the steps round differently); bf16 decode speed beside unquantized, with and without the
    probe; recompiles after warm-up."""
    import torch._dynamo

    from oc_engine.bench.decode import bench_mode
    from oc_engine.models.quantize import QuantizedLinear, linear_weight_bytes, quantize_model

    out: dict = {"kernel": {}}
    torch.manual_seed(0)
    for scheme in ("int8", "int4"):
        weight = (torch.randn(256, 512, device=device) * 0.05).bfloat16()
        layer = QuantizedLinear.from_weight(weight, scheme)
        x = torch.randn(5, 512, device=device).bfloat16()
        expected = x.float() @ layer.dequantized().float().t()
        out["kernel"][scheme] = round(float((layer(x).float() - expected).abs().max() / expected.abs().max()), 5)
    shape = dict(TINY_SHAPE, num_key_value_heads=4) if tiny else SHAPES["smollm2-135m"]
    new, repeats = (8, 1) if tiny else (256, 3)
    prompt = [2] + [5 + i for i in range(31)]
    counters = torch._dynamo.utils.counters
    out["speed"], out["tokens"] = {}, {}
    for scheme in ("none", "int8", "int4"):
        loaded = random_model(shape, torch.bfloat16, device)
        if scheme != "none":
            quantize_model(loaded.model, scheme)
            loaded.quantization = scheme
        ids = torch.tensor([prompt], device=device)
        hf = loaded.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, len(prompt):]
        rows = {}
        for mode in ("engine_compiled", "engine_compiled_probe"):
            before = counters["stats"]["unique_graphs"]
            r = bench_mode(mode, loaded, prompt, new, repeats)
            rows[mode] = {"tokens_per_s": round(r.tokens_per_s, 1), "ms_per_token": round(r.ms_per_token, 3),
                          "graphs": counters["stats"]["unique_graphs"] - before}
            if mode == "engine_compiled":
                same = [a == b for a, b in zip(r.tokens, hf.tolist())]
                out["tokens"][scheme] = {"first_difference_from_hf": same.index(False) if False in same else None,
                                         "of": new}
        weights = linear_weight_bytes(loaded.model)
        rows["weight_gb_per_s"] = round(weights * rows["engine_compiled"]["tokens_per_s"] / 1e9, 1)
        rows["probe_share_of_step"] = round(1 - rows["engine_compiled_probe"]["tokens_per_s"]
                                            / rows["engine_compiled"]["tokens_per_s"], 4)
        out["speed"][scheme] = rows
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out["speed"]["none"]["engine_compiled"]["tokens_per_s"]
    for scheme in ("int8", "int4"):
        out["speed"][scheme]["x_unquantized"] = round(out["speed"][scheme]["engine_compiled"]["tokens_per_s"] / base, 3)
    out["ok"] = bool(max(out["kernel"].values()) < 0.02)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU run, for the test)")
    parser.add_argument("--section", action="append", help="run only these sections (repeatable)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(args.out)
    sections = {"environment": (environment, device), "kernel": (kernel, device, args.tiny),
                "correctness": (correctness, device, args.tiny), "speed": (speed, device, args.tiny),
                "guard": (guard, device, args.tiny), "quantized": (quantized, device, args.tiny)}
    for name, (fn, *fn_args) in sections.items():
        if not args.section or name in args.section:
            report.run(name, fn, *fn_args)
    failed = [name for name, result in report.data["sections"].items() if "error" in result]
    print(f"check: wrote {report.path}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
