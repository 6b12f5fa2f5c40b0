"""`oc-engine eval`: the guard measured end to end.

Replay: labelled exchanges are teacher-forced through the target (the first
`max_response_tokens` tokens of each response), the probe scores every token with the
kernel's maths at the generation positions, and `SequenceGuard` (the policy generation uses)
decides; each check asks the classifier about the partial answer it covers (synchronously:
replay has no clock), and with no classifier a pause blocks (fail closed). Reported: block
rate per label, the benign (safe_compliance) block rate, and the detection position.

Live: the engine generates for prompt files under the full guard (probe in the step,
classifier beside decoding), and reports per file and prompt label how many answers were
blocked, refused (the refusal detector on the released text) and either.
"""

from __future__ import annotations

import numpy as np
import torch

from oc_engine.data import LABELS, UNSAFE, Exchange
from oc_engine.engine.guard import PAUSE, WARN, Check, GuardConfig, SequenceGuard, token_flags
from oc_engine.training.onpolicy import is_refusal


def replay(loaded, probe, exchanges: list[Exchange], classifier=None, *, guard_config: GuardConfig | None = None,
           max_response_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, one outcome per exchange: status, paused, first_pause, peak_ema)."""
    from oc_engine.training.activations import CollectSpec, collect, exchange_ids
    from oc_engine.training.probe_training import ema_traces, probe_logits

    model, tokenizer = loaded.model, loaded.tokenizer
    points = model.config.get_text_config().num_hidden_layers + 1
    layers = tuple(layer % points for layer in probe.config.layers)  # the weight's row order
    spec = CollectSpec(layers=layers, mode="tokens", max_response_tokens=max_response_tokens)
    acts = collect(model, tokenizer, exchanges, spec, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        traces = ema_traces(probe_logits(acts.features, probe.weight, probe.bias), acts.mask,
                            probe.config.alpha).numpy()
    config = guard_config or GuardConfig(every=probe.config.every)
    outcomes = []
    for exchange, trace, valid in zip(exchanges, traces, acts.mask.numpy()):
        ids, prompt_len = exchange_ids(tokenizer, exchange, spec)
        response_ids = ids[prompt_len:]
        outcome = _replay_one(exchange, response_ids, trace[valid], probe.config, config, classifier, tokenizer)
        outcomes.append({**outcome, "peak_ema": float(trace[valid].max()) if valid.any() else 0.0})
    return summarize(exchanges, outcomes), outcomes


def _replay_one(exchange, response_ids, trace, probe_config, config, classifier, tokenizer) -> dict:
    guard = SequenceGuard(config)
    pending: list[Check] = []

    def apply(actions):
        pending.extend(a for a in actions if isinstance(a, Check))

    def answer_checks():
        while pending:
            check = pending.pop()
            if classifier is None:
                apply(guard.on_no_classifier())
                continue
            partial = tokenizer.decode(response_ids[:check.covers], skip_special_tokens=True)
            apply(guard.on_verdict(check, classifier.judge(exchange.prompt, partial)["verdict"]))

    for ema in trace:
        flags = (WARN if ema >= probe_config.warn else 0) | (PAUSE if ema >= probe_config.pause else 0)
        apply(guard.on_token(token_flags(flags, None, float(ema))))  # a NaN EMA pauses, as in the engine
        answer_checks()
        if not guard.wants_tokens:
            break
    apply(guard.on_finish())
    answer_checks()
    return {"status": guard.status, "paused": bool(guard.pause_points),
            "first_pause": guard.pause_points[0] if guard.pause_points else None}


def summarize(exchanges: list[Exchange], outcomes: list[dict]) -> dict:
    labels = np.array([e.label for e in exchanges])
    blocked = np.array([o["status"] == "blocked" for o in outcomes])
    paused = np.array([o["paused"] for o in outcomes])
    per_label = {}
    for i, name in enumerate(LABELS):
        rows = labels == i
        if rows.any():
            per_label[name] = {"exchanges": int(rows.sum()), "block_rate": round(float(blocked[rows].mean()), 4),
                               "pause_rate": round(float(paused[rows].mean()), 4)}
    firsts = [o["first_pause"] + 1 for o, label in zip(outcomes, labels) if label == UNSAFE and o["paused"]]
    return {"exchanges": len(exchanges), "per_label": per_label,
            "benign_block_rate": per_label.get("safe_compliance", {}).get("block_rate"),
            "unsafe_block_rate": per_label.get("unsafe_compliance", {}).get("block_rate"),
            "median_tokens_to_pause_unsafe": float(np.median(firsts)) if firsts else None}


def live(llm, rows, *, max_new_tokens: int = 96, progress: bool = True) -> dict:
    """rows: PromptRow list, answered through `llm` (an `LLM` with its guard). Returns rates per
    (source, label) and every answer."""
    from tqdm.auto import tqdm

    from oc_engine.params import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens)
    with tqdm(total=len(rows), desc="eval live", unit="prompt", disable=not progress) as bar:
        completions = llm.generate([r.prompt for r in rows], params, progress=lambda _c: bar.update(1))
    answers = []
    for row, c in zip(rows, completions):
        refused = c.guard.status != "blocked" and is_refusal(c.text)
        answers.append({"prompt": row.prompt, "prompt_label": row.prompt_label, "source": row.source,
                        "status": c.guard.status, "reason": c.guard.reason, "refused": refused,
                        "verdicts": [v.verdict for v in c.guard.verdicts], "text": c.text,
                        "refusal": c.refusal, "pause_points": list(c.guard.pause_points)})
    groups = {}
    for a in answers:
        key = f"{a['source']} ({a['prompt_label']})"
        g = groups.setdefault(key, {"prompts": 0, "blocked": 0, "refused": 0, "held": 0})
        g["prompts"] += 1
        g["blocked"] += a["status"] == "blocked"
        g["held"] += a["status"] == "held"
        g["refused"] += a["refused"]
    for g in groups.values():
        n = g["prompts"]
        g.update(block_rate=round(g["blocked"] / n, 4), refusal_rate=round(g["refused"] / n, 4),
                 blocked_or_refused=round((g["blocked"] + g["refused"] + g["held"]) / n, 4))
    return {"groups": groups, "answers": answers}


def eval_markdown(report: dict) -> str:
    lines = []
    if "replay" in report:
        r = report["replay"]
        lines += ["Replay (teacher-forced exchanges through probe, classifier and policy):", "",
                  "| label | exchanges | paused | blocked |", "|---|---:|---:|---:|"]
        for name, v in r["per_label"].items():
            lines.append(f"| {name} | {v['exchanges']} | {v['pause_rate']:.1%} | {v['block_rate']:.1%} |")
        med = r["median_tokens_to_pause_unsafe"]
        lines += ["", f"median response tokens before the pause (unsafe): {'-' if med is None else f'{med:.0f}'}", ""]
    if "live" in report:
        lines += ["Live generation under the guard:", "",
                  "| prompts | n | blocked | refused | held | blocked or refused |", "|---|---:|---:|---:|---:|---:|"]
        for key, g in report["live"]["groups"].items():
            lines.append(f"| {key} | {g['prompts']} | {g['block_rate']:.1%} | {g['refusal_rate']:.1%} | "
                         f"{g['held']} | {g['blocked_or_refused']:.1%} |")
    return "\n".join(lines)
