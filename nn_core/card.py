"""The model card: one Markdown page per candidate with its data, config, metrics and gate decision."""

from __future__ import annotations

import numpy as np


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(*, model_name: str, version: str, run_id: str, dataset: str, digest: str, split_sizes: dict,
               model_config: dict, train_config: dict, train_metrics: dict, parity: dict,
               decision: dict, classes: list[str]) -> str:
    val_cm = np.asarray(train_metrics["val_confusion"])
    per_class = [
        [c, f"{v:.2%}", f"{t:.2%}"]
        for c, v, t in zip(classes, train_metrics["val_per_class_accuracy"], train_metrics["test_per_class_accuracy"])
    ]
    return "\n\n".join([
        f"# Model card: {model_name} version {version}",
        f"**Gate decision: {decision['promotion'].upper()}** — {decision['reason']}",
        "## Data\n" + _table(["dataset", "digest (SHA-256)", "train", "validation", "test"],
                             [[dataset, f"`{digest}`", split_sizes.get("train"), split_sizes.get("val"), split_sizes.get("test")]]),
        "## Model\n" + _table(["setting", "value"], [[k, v] for k, v in model_config.items()]),
        "## Training\n" + _table(["setting", "value"], [[k, v] for k, v in train_config.items()])
        + f"\n\nMLflow run: `{run_id}`; {train_metrics['epochs']} epochs in {train_metrics['train_seconds']:.1f} s "
          f"on {train_metrics['world_size']} x {train_metrics['device']} ({train_metrics['backend']}).",
        "## Metrics\n" + _table(
            ["split", "accuracy", "loss"],
            [["validation (PyTorch)", f"{train_metrics['val_accuracy']:.4%}", f"{train_metrics['val_loss']:.4f}"],
             ["validation (ONNX, gate)", f"{decision['val_accuracy']:.4%}", ""],
             ["test (PyTorch)", f"{train_metrics['test_accuracy']:.4%}", f"{train_metrics['test_loss']:.4f}"]]),
        "## Per-class accuracy\n" + _table(["class", "validation", "test"], per_class),
        "## Confusion matrix (validation; rows true, columns predicted)\n"
        + _table(["", *classes], [[c, *row] for c, row in zip(classes, val_cm.tolist())]),
        "## ONNX parity\n" + _table(["check", "value"], [
            ["max abs logit difference (whole validation split)", f"{parity['max_abs_diff']:.3g}"],
            *[[f"max abs difference at batch size {b}", f"{d:.3g}"] for b, d in parity["batch_max_abs_diff"].items()],
            ["argmax agreement", f"{parity['argmax_agreement']:.4%}"],
            ["accuracy PyTorch / ONNX", f"{parity['torch_accuracy']:.4%} / {parity['onnx_accuracy']:.4%}"],
            ["tolerance", f"{parity['tolerance']:g}"], ["result", parity["reason"]]]),
        "## Gate\n" + _table(["check", "value"], [
            ["threshold", decision["threshold"]], ["margin", decision["margin"]],
            ["candidate validation accuracy (ONNX)", f"{decision['val_accuracy']:.4%}"],
            ["champion before", decision["champion_version"] or "none"],
            ["champion validation accuracy (ONNX)", "n/a" if decision["champion_val_accuracy"] is None else f"{decision['champion_val_accuracy']:.4%}"],
            ["decision", decision["promotion"]], ["reason", decision["reason"]]]),
    ]) + "\n"
