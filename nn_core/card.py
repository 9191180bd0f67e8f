"""The model card: one Markdown page per candidate with its data, config, metrics and gate decision.

MLflow 3.17's version page renders a description's Markdown tables without cell borders or padding,
so a confusion matrix read as a run of numbers. Each table is therefore a fenced block of columns
aligned in a monospace font, which every Markdown renderer shows as it is written."""

from __future__ import annotations

import re

import numpy as np

from nn_core.slices import table as slice_table


def _table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    # Columns of figures right-aligned (digits under digits), columns of words left-aligned.
    figures = [all(re.fullmatch(r"[-+0-9.e%/ ]*", r[i]) for r in cells[1:]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if f else c.ljust(w) for c, w, f in zip(r, widths, figures)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "```text\n" + "\n".join(lines) + "\n```"


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
        # One row per field: a row of the 64-character digest beside the sizes overflows the page.
        "## Data\n" + _table(["field", "value"], [
            ["dataset", dataset], ["digest (SHA-256)", digest], ["train images", split_sizes.get("train")],
            ["validation images", split_sizes.get("val")], ["test images", split_sizes.get("test")]]),
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
            ["threshold", decision["threshold"]],
            ["tolerance per slice", "2 standard errors of the paired difference" if decision["margin"] is None
             else f"fixed margin {decision['margin']}"],
            ["candidate validation accuracy (ONNX)", f"{decision['val_accuracy']:.4%}"],
            ["champion before", decision["champion_version"] or "none"],
            ["champion validation accuracy (ONNX)", "n/a" if decision["champion_val_accuracy"] is None else f"{decision['champion_val_accuracy']:.4%}"],
            ["forced (--force)", "yes" if decision.get("forced") else "no"],
            ["decision", decision["promotion"]]])
        + f"\n\nReason: {decision['reason']}. The full record is the run's artifact "
          f"`gate/v{version}/decision-{decision.get('decided_at', 0)}.json`.",
        *(["## Gate per slice (the validation split and each feedback hold-out)\n"
           + _table(*slice_table(decision["slices"]))] if decision.get("slices") else []),
    ]) + "\n"
