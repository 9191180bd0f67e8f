"""PNG figures for a training run: loss curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(step_losses: list[float], steps_per_epoch: int, history: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(np.arange(1, len(step_losses) + 1) / steps_per_epoch, step_losses, lw=0.6, alpha=0.6, label="train loss (step)")
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss (epoch)")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * h["val_accuracy"] for h in history], "^-", color="tab:green", label="validation accuracy")
    ax2.set_ylabel("validation accuracy (%)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=100)
    ax.imshow(np.log1p(cm), cmap="Blues")
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
