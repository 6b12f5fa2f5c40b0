"""The embedded model's own labelled answers, shared by the default probe and classifier builds.

Three files, each collected once into the user cache (greedy, `ONPOLICY_TOKENS` tokens,
labelled by prompt label and the refusal detector; see `onpolicy`):

- a sample of the shared prompt files (`SAMPLED`): harmful requests and everyday benign ones;
- `TOPIC_MATCHED` benign Alpaca prompts nearest to the harmful training prompts, and
- `TWINS` templated benign twins of the harmful training prompts (see `topic_matched`):
  safe answers on harmful topics, so neither stage learns the topic alone;
- contrast prompts (see `contrast`): benign requests written by category that use dangerous
  words in a safe sense, and the benign pool's prompts that contain such words.

Only `train/` prompts are used. Among them are the JailbreakBench goals, which are the dev
file's harmful half (the data README says so); no dev benign prompt is trained on.
"""

from __future__ import annotations

from pathlib import Path

from oc_engine.training.topic_matched import benign_twins

# (file, source filter, how many distinct prompts). GPTFuzz's bare questions (train half) and the
# JailbreakBench goals that refusal_direction answered widen the harm categories beyond "how to"
# requests (misinformation, harassment, sexual content, expert advice). The JailbreakBench goals
# are the dev file's harmful half: the data README says so, and the README reports it.
SAMPLED = (("advbench.jsonl", None, 200), ("maliciousinstruct.jsonl", None, 100),
           ("alpaca_harmful_splits.jsonl", "harmful_train", 200),
           ("gptfuzz_labeled.jsonl", "gptfuzz:train", None),
           ("refusal_direction_completions.jsonl", "jailbreakbench", None),
           ("alpaca_harmful_splits.jsonl", "harmless_train", 500))
# Harmful prompts the benign pool is matched against and twinned.
ANCHORS = (("advbench.jsonl", None), ("maliciousinstruct.jsonl", None),
           ("alpaca_harmful_splits.jsonl", "harmful_train"), ("gptfuzz_labeled.jsonl", "gptfuzz:train"),
           ("refusal_direction_completions.jsonl", "jailbreakbench"))
BENIGN_POOL = ("alpaca_harmful_splits.jsonl", "harmless_train")
TOPIC_MATCHED = 600
TWINS, TWINS_PER_PROMPT = 700, 2
ONPOLICY_TOKENS = 64


def embedded_onpolicy_specs(log, progress: bool, loaded=None) -> list[tuple[str, None]]:
    """The on-policy files as training data specs, for the embedded model (`loaded`, or loaded
    here to find or collect them)."""
    from oc_engine.data import require_shared_data_dir
    from oc_engine.models.loading import load_model

    root = require_shared_data_dir()
    loaded = loaded if loaded is not None else load_model(None, progress=False)
    return [(str(f), None) for f in default_onpolicy_files(loaded, root, log, progress)]


def default_onpolicy_files(loaded, root: Path, log, progress: bool) -> list[Path]:
    """[sampled answers, topic-matched benign answers, benign twins], collected on first use."""
    from oc_engine.guard.probe import ModelFingerprint
    from oc_engine.models.embedded import cache_root

    stem = cache_root() / "onpolicy" / ModelFingerprint.of(loaded.model).weights_hash[:12]
    sampled = Path(f"{stem}-default-v2.jsonl")
    matched = Path(f"{stem}-topic-matched-v2.jsonl")
    twins = Path(f"{stem}-benign-twins-v2.jsonl")
    contrast = Path(f"{stem}-contrast-v1.jsonl")
    _collect_once(loaded, sampled, lambda: _sampled_prompts(root), log, progress)
    _collect_once(loaded, matched, lambda: _topic_matched_prompts(root, log), log, progress)
    _collect_once(loaded, twins, lambda: benign_twins(_anchors(root), TWINS_PER_PROMPT, TWINS), log, progress)
    _collect_once(loaded, contrast, lambda: _contrast_prompts(root, matched), log, progress)
    return [sampled, matched, twins, contrast]


def _collect_once(loaded, out: Path, prompts, log, progress: bool) -> None:
    from oc_engine.training.onpolicy import collect_onpolicy

    if out.is_file():
        log(f"on-policy answers: {out} (cached)")
        return
    rows = prompts()
    log(f"collecting the embedded model's own answers to {len(rows)} prompts into {out}")
    collect_onpolicy(loaded, rows, out, max_new_tokens=ONPOLICY_TOKENS, progress=progress)


def _sampled_prompts(root: Path) -> list:
    from oc_engine.training.onpolicy import read_labelled_prompts, sample_prompts

    rows = []
    for name, source, limit in SAMPLED:
        distinct = {r.prompt: r for r in read_labelled_prompts(root / "train" / name, source_filter=source)}
        rows += sample_prompts(list(distinct.values()), limit)
    return rows


def _contrast_prompts(root: Path, matched: Path) -> list:
    """The written contrast prompts, and the benign pool's prompts with a word of harm that the
    topic-matched file does not already hold."""
    from oc_engine.jsonl import iter_jsonl
    from oc_engine.training.contrast import keyword_mined, written_rows
    from oc_engine.training.onpolicy import read_labelled_prompts
    from oc_engine.training.splits import prompt_key

    pool = read_labelled_prompts(root / "train" / BENIGN_POOL[0], source_filter=BENIGN_POOL[1])
    taken = {prompt_key(row["prompt"]) for _, row in iter_jsonl(matched, required=("prompt",))}
    return written_rows() + keyword_mined(pool, taken)


def _anchors(root: Path) -> list:
    """The harmful training prompts, each once."""
    from oc_engine.training.onpolicy import read_labelled_prompts

    anchors = []
    for name, source in ANCHORS:
        anchors += [r for r in read_labelled_prompts(root / "train" / name, source_filter=source)
                    if r.prompt_label == "harmful"]
    return list({r.prompt: r for r in anchors}.values())


def _topic_matched_prompts(root: Path, log) -> list:
    from oc_engine.models.embedded import embedded_classifier_backbone
    from oc_engine.training.onpolicy import PromptRow, read_labelled_prompts
    from oc_engine.training.topic_matched import topic_matched_benign

    anchors = _anchors(root)
    pool = read_labelled_prompts(root / "train" / BENIGN_POOL[0], source_filter=BENIGN_POOL[1])
    log(f"ranking {len(pool)} benign prompts by similarity to {len(anchors)} harmful ones (all-MiniLM-L6-v2)")
    chosen = topic_matched_benign(pool, anchors, TOPIC_MATCHED, embedded_classifier_backbone())
    return [PromptRow(r.prompt, r.prompt_label, f"{r.source}:topic_matched", r.category) for r in chosen]
