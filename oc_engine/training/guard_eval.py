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
from oc_engine.guard.policy import PAUSE, WARN, Check, GuardConfig, SequenceGuard, token_flags
from oc_engine.training.onpolicy import is_refusal


def replay_traces(loaded, probe, exchanges: list[Exchange], *, alphas=None, max_response_tokens: int = 64,
                  batch_size: int = 8, progress: bool = True, keep_states: bool = False):
    """({alpha: [E] arrays of each response's EMA per token}, each response's token ids): the
    teacher-forced probe scores with the kernel's maths, at the generation positions; with
    `keep_states`, the tapped states too (`Activations`, what a state reader reads)."""
    from oc_engine.training.activations import CollectSpec, collect, exchange_ids
    from oc_engine.training.probe_training import ema_traces, probe_logits

    model, tokenizer = loaded.model, loaded.tokenizer
    points = model.config.get_text_config().num_hidden_layers + 1
    layers = tuple(layer % points for layer in probe.config.layers)  # the weight's row order
    spec = CollectSpec(layers=layers, mode="tokens", max_response_tokens=max_response_tokens)
    acts = collect(model, tokenizer, exchanges, spec, batch_size=batch_size, progress=progress)
    mask = acts.mask.numpy()
    traces = {}
    with torch.no_grad():
        logits = probe_logits(acts.features, probe.weight, probe.bias)
        for alpha in alphas or (probe.config.alpha,):
            ema = ema_traces(logits, acts.mask, alpha).numpy()
            traces[alpha] = [row[valid] for row, valid in zip(ema, mask)]
    response_ids = []
    for exchange in exchanges:
        ids, prompt_len = exchange_ids(tokenizer, exchange, spec)
        response_ids.append(ids[prompt_len:])
    return (traces, response_ids, acts) if keep_states else (traces, response_ids)


def replay(loaded, probe, exchanges: list[Exchange], classifier=None, *, guard_config: GuardConfig | None = None,
           max_response_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, one outcome per exchange: status, paused, first_pause, peak_ema). A state
    reader judges each check from the teacher-forced states of the tokens it covers."""
    reads_states = getattr(classifier, "reads_states", False)
    traces, response_ids, *acts = replay_traces(loaded, probe, exchanges, max_response_tokens=max_response_tokens,
                                                batch_size=batch_size, progress=progress, keep_states=reads_states)
    config = guard_config or GuardConfig(every=probe.config.every)
    tokenizer = loaded.tokenizer
    outcomes = []
    for row, (exchange, trace, ids) in enumerate(zip(exchanges, traces[probe.config.alpha], response_ids)):
        def judge(covers, exchange=exchange, ids=ids, row=row):
            if classifier is None:
                return None
            if reads_states:
                from oc_engine.guard.pooled_states import pool

                return classifier.judge_features(pool(acts[0].features[row, :max(covers, 1)].float().numpy(),
                                                      classifier.config.recent))["verdict"]
            partial = tokenizer.decode(ids[:covers], skip_special_tokens=True)
            return classifier.judge(exchange.prompt, partial)["verdict"]

        outcome = replay_policy(trace, probe.config.warn, probe.config.pause, config, judge)
        outcomes.append({**outcome, "peak_ema": float(trace.max()) if len(trace) else 0.0})
    return summarize(exchanges, outcomes), outcomes


def replay_policy(trace, warn: float, pause: float, config: GuardConfig, judge) -> dict:
    """One answer's EMA trace fed token by token through `SequenceGuard`; each check is answered
    at once by `judge(covers) -> verdict` for the answer's first `covers` tokens (0: the input
    check, the prompt alone; None: no classifier, fail closed)."""
    guard = SequenceGuard(config)
    pending: list[Check] = []
    asked = []

    def apply(actions):
        pending.extend(a for a in actions if isinstance(a, Check))

    def answer_checks():
        while pending:
            check = pending.pop()
            asked.append(check)
            verdict = judge(check.covers)
            apply(guard.on_no_classifier() if verdict is None else guard.on_verdict(check, verdict))

    apply(guard.start())
    answer_checks()
    for ema in trace:
        flags = (WARN if ema >= warn else 0) | (PAUSE if ema >= pause else 0)
        apply(guard.on_token(token_flags(flags, None, float(ema))))  # a NaN EMA pauses, as in the engine
        answer_checks()
        if not guard.wants_tokens:
            break
    apply(guard.on_finish())
    answer_checks()
    return {"status": guard.status, "paused": bool(guard.pause_points),
            "first_pause": guard.pause_points[0] if guard.pause_points else None,
            "checks": sum(not c.final and not c.input for c in asked)}


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
        completions = llm.generate([r.request for r in rows], params, progress=lambda _c: bar.update(1))
    answers = []
    for row, c in zip(rows, completions):
        refused = c.guard.status != "blocked" and is_refusal(c.text)
        answers.append({"prompt": row.prompt, "prompt_label": row.prompt_label, "source": row.source,
                        "status": c.guard.status, "reason": c.guard.reason, "refused": refused,
                        "verdicts": [v.verdict for v in c.guard.verdicts], "text": c.text,
                        "escalated": any(not v.final for v in c.guard.verdicts) or bool(c.guard.pause_points),
                        "refusal": c.refusal, "pause_points": list(c.guard.pause_points)})
    groups = {}
    for a in answers:
        key = f"{a['source']} ({a['prompt_label']})"
        g = groups.setdefault(key, {"prompts": 0, "blocked": 0, "refused": 0, "held": 0, "escalated": 0})
        g["prompts"] += 1
        g["escalated"] += a["escalated"]
        g["blocked"] += a["status"] == "blocked"
        g["held"] += a["status"] == "held"
        g["refused"] += a["refused"]
    for g in groups.values():
        n = g["prompts"]
        g.update(block_rate=round(g["blocked"] / n, 4), refusal_rate=round(g["refused"] / n, 4),
                 escalation_rate=round(g["escalated"] / n, 4),
                 blocked_or_refused=round((g["blocked"] + g["refused"] + g["held"]) / n, 4))
    return {"groups": groups, "answers": answers}


def eval_markdown(report: dict) -> str:
    guard = report.get("guard", {})
    lines = []
    if "replay" in report:
        r = report["replay"]
        lines += [f"Replay (teacher-forced exchanges through probe, classifier and policy; final check "
                  f"{'on' if guard.get('final_check') else 'off'}, input check "
                  f"{'on' if guard.get('input_check') else 'off'}):", "",
                  "| label | exchanges | paused | blocked |", "|---|---:|---:|---:|"]
        for name, v in r["per_label"].items():
            lines.append(f"| {name} | {v['exchanges']} | {v['pause_rate']:.1%} | {v['block_rate']:.1%} |")
        med = r["median_tokens_to_pause_unsafe"]
        lines += ["", f"median response tokens before the pause (unsafe): {'-' if med is None else f'{med:.0f}'}", ""]
    if "live" in report:
        lines += [f"Live generation under the guard (final check {'on' if guard.get('final_check') else 'off'}, "
                  f"input check {'on' if guard.get('input_check') else 'off'}; escalated: the classifier was "
                  "asked before the end, at a pause or the input check):", "",
                  "| prompts | n | escalated | blocked | refused | held | blocked or refused |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, g in report["live"]["groups"].items():
            lines.append(f"| {key} | {g['prompts']} | {g['escalation_rate']:.1%} | {g['block_rate']:.1%} | "
                         f"{g['refusal_rate']:.1%} | {g['held']} | {g['blocked_or_refused']:.1%} |")
    return "\n".join(lines)
