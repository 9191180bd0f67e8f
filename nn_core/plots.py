"""PNG figures for a training run: loss and accuracy curves, the confusion matrix, per-class accuracy.

Written for the people who read them in the MLflow UI: a title on every figure, one colour per series
and its legend outside the data, a colour bar for colour scales, and accuracy axes that start where
the eye does not exaggerate a one-point difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
# Figures without pyplot: no backend or figure manager to import and set up (no display on servers
# and workers); savefig renders a PNG with Agg.
from matplotlib.figure import Figure

# One colour per series, the same in every figure (matplotlib's default cycle, named).
COLOURS = {"step": "#9ecae1", "train": "tab:blue", "val": "tab:orange", "val_acc": "tab:green",
           "test": "tab:purple"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


def _inside(artists) -> None:
    """Labels drawn inside the axes (cell counts, bar and point values) are left out of the layout
    computations: they cannot widen the figure, and measuring each one's text is most of a figure's
    drawing time."""
    for a in artists:
        a.set_in_layout(False)


def loss_curve(step_losses: list[float], steps_per_epoch: int, history: list[dict], path: Path,
               title: str = "Training curves") -> Path:
    """Left: cross-entropy per step and per epoch (train, validation). Right: validation accuracy."""
    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax, acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    epochs = [h["epoch"] for h in history]
    ax.plot(np.arange(1, len(step_losses) + 1) / steps_per_epoch, step_losses, lw=0.6,
            color=COLOURS["step"], label="train loss (each step)")
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color=COLOURS["train"], label="train loss (epoch mean)")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", color=COLOURS["val"], label="validation loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy (log scale)", yscale="log", title="Loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)

    values = [100 * h["val_accuracy"] for h in history]
    acc.plot(epochs, values, "^-", color=COLOURS["val_acc"], label="validation accuracy")
    _inside(acc.annotate(f"{v:.2f}", (e, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
            for e, v in zip(epochs, values))
    low = min(values) if values else 0.0
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy",
            ylim=(max(0.0, min(low - 2.0, 90.0)), 100.0))
    acc.grid(alpha=0.3)
    acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    """Counts with a logarithmic colour scale (the diagonal dwarfs the errors), and its colour bar."""
    cm = np.asarray(cm)
    fig = Figure(figsize=(7.2, 6), dpi=100)
    ax = fig.subplots()
    # LogNorm needs positive values: empty cells are drawn as the lowest colour.
    image = ax.imshow(np.maximum(cm, 1), cmap="Blues", norm=LogNorm(vmin=1, vmax=max(int(cm.max()), 2)))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images (log scale)")
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right" if max(map(len, classes)) > 2 else "center")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix, {title}")
    threshold = np.sqrt(max(int(cm.max()), 1))  # the log scale's midpoint
    _inside(ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > threshold else "black") for i in range(n) for j in range(n))
    fig.tight_layout()
    return _save(fig, path)


def per_class_accuracy(val: list[float], test: list[float], classes: list[str], path: Path,
                       title: str = "Accuracy per class") -> Path:
    """Grouped bars, validation and test, each labelled with its value; the axis starts at a round
    figure below the worst class rather than at the data, so bars keep their proportions."""
    x = np.arange(len(classes))
    width = 0.4
    fig = Figure(figsize=(max(7, 0.8 * len(classes)), 4.2), dpi=100)
    ax = fig.subplots()
    for offset, values, name, colour in ((-width / 2, val, "validation", COLOURS["val"]),
                                         (width / 2, test, "test", COLOURS["test"])):
        bars = ax.bar(x + offset, [100 * v for v in values], width, label=name, color=colour)
        _inside(ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2))
    worst = 100 * min([*val, *test]) if (val or test) else 0.0
    ax.set_ylim(max(0.0, 10 * np.floor(worst / 10) - 10), 101)
    long_names = max(map(len, classes)) > 2
    ax.set_xticks(x, classes, rotation=30 if long_names else 0, ha="right" if long_names else "center")
    ax.set(xlabel="class", ylabel="accuracy (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)
