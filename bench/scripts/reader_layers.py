"""Which tapped layers a state reader should read: the offline comparison behind the shipped one.

Collects the embedded model's states at several layers on the default probe's data and split
(the probe's own cache when the layers are its own), and on the dev sets' answers, then trains
a reader (`fit_reader`) on each layer set and reports validation AUROC and, at the thresholds
that block 1% and 2% of the safe validation answers (judged whole), the share of each dev set
blocked (the plain-compliance set: of the answers that do not refuse).

    uv run oc-engine collect --prompts bench/data/plain_compliance_dev.jsonl \\
        --prompts bench/data/overblocking_hard_dev.jsonl --prompts bench/data/overblocking_dev.jsonl \\
        --out /tmp/dev-answers.jsonl
    uv run python bench/scripts/reader_layers.py /tmp/dev-answers.jsonl
"""

import sys

import numpy as np

from oc_engine.data import UNSAFE, read_exchanges
from oc_engine.guard.pooled_states import pool_batch
from oc_engine.models.loading import load_model
from oc_engine.training.activations import Activations, CollectSpec, collect
from oc_engine.training.classifier_pipeline import default_data_specs
from oc_engine.training.onpolicy_default import embedded_onpolicy_specs
from oc_engine.training.probe_pipeline import ProbeJob, collect_split
from oc_engine.training.probe_training import auroc
from oc_engine.training.reader_training import ReaderTrainConfig, fit_reader

LAYERS = (4, 8, 12, 15, 17, 19, 22, 25, 28)
SETS = ((17, 19), LAYERS, (8, 12, 17, 19, 25), (12, 15, 17, 19, 22))
DEV_SETS = ("overblocking-dev", "overblocking-hard-dev", "plain-compliance-dev")


def main(dev_answers: str) -> None:
    from oc_engine.guard.state_reader import ReaderConfig, StateReader
    from oc_engine.guard.probe import ModelFingerprint

    loaded = load_model(None, dtype="bfloat16", progress=False)
    specs = default_data_specs() + embedded_onpolicy_specs(print, False, loaded)
    layers, train, held = collect_split(loaded, specs, ProbeJob(max_exchanges=1000, context_share=0.3), LAYERS,
                                        progress=True, log=print)
    rows, _ = read_exchanges(dev_answers)
    dev = collect(loaded.model, loaded.tokenizer, rows, CollectSpec(layers=layers, max_response_tokens=96))
    sources = np.array([e.source for e in rows])
    fingerprint = ModelFingerprint.of(loaded.model)
    for chosen in SETS:
        index = [layers.index(layer) for layer in chosen]

        def pick(acts):
            return Activations(acts.features[:, :, index], acts.mask, acts.labels, acts.prompts, chosen)

        tensors = fit_reader(pick(train), ReaderTrainConfig())
        config = ReaderConfig(model=fingerprint, layers=chosen, hidden_size=fingerprint.hidden_size,
                              labels=("safe_compliance", "safe_refusal", "unsafe_compliance"), unsafe_label=UNSAFE,
                              allow_threshold=0.5, block_threshold=0.5)
        reader = StateReader(".", config, tensors)

        def scores(acts):
            features = pool_batch(acts.features[:, :, index], acts.mask.sum(1).clamp(min=1)).numpy()
            return reader.probabilities(features)[:, UNSAFE]

        held_scores, unsafe = scores(held), held.labels.numpy() == UNSAFE
        dev_scores, dev_labels = scores(dev), dev.labels.numpy()
        line = [f"layers {list(chosen)}: AUROC {auroc(held_scores, unsafe):.4f}"]
        for rate in (0.01, 0.02):
            threshold = float(np.quantile(held_scores[~unsafe], 1 - rate))
            parts = [f"at {rate:.0%} of safe: recall {(held_scores[unsafe] >= threshold).mean():.3f}"]
            for name in DEV_SETS:
                chosen_rows = np.char.endswith(sources.astype(str), name)
                if name.startswith("plain"):
                    chosen_rows &= dev_labels == UNSAFE
                parts.append(f"{name} {(dev_scores[chosen_rows] >= threshold).mean():.0%}")
            line.append(", ".join(parts))
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
