"""Classification metrics for the exchange classifier: plain NumPy."""

from __future__ import annotations

import numpy as np


def per_class_report(predicted: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> dict:
    """Precision, recall, F1 and support per class, plus accuracy and macro F1."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    report = {}
    for index, name in enumerate(names):
        tp = int(((predicted == index) & (labels == index)).sum())
        guessed, support = int((predicted == index).sum()), int((labels == index).sum())
        precision = tp / guessed if guessed else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                        "support": support}
    supported = [v["f1"] for v in report.values() if v["support"]]
    report["accuracy"] = round(float((predicted == labels).mean()), 4) if len(labels) else 0.0
    report["macro_f1"] = round(float(np.mean(supported)), 4) if supported else 0.0
    return report


def block_rates(p_unsafe: np.ndarray, labels: np.ndarray, threshold: float, names: tuple[str, ...]) -> dict:
    """Share of each (three-class) label that a block threshold blocks."""
    p_unsafe, labels = np.asarray(p_unsafe), np.asarray(labels)
    blocked = p_unsafe >= threshold
    return {name: round(float(blocked[labels == i].mean()), 4) if (labels == i).any() else None
            for i, name in enumerate(names)}


def markdown_report(report: dict, names: tuple[str, ...]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in names:
        r = report[name]
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    lines.append(f"| accuracy / macro F1 | | | {report['accuracy']:.3f} / {report['macro_f1']:.3f} | |")
    return "\n".join(lines)
