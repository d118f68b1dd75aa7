"""PNG plots (matplotlib, Agg backend): the confusion matrix, drift against a reference profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# matplotlib is imported inside each function (~0.7 s): only a report that draws a PNG pays it.


def confusion_matrix_png(matrix: list[list[int]], labels: list[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png", metadata={"Software": "tunelab"})  # marks the file as tunelab's
    plt.close(fig)
    return path


def drift_png(reference, current, labels: list[str], path: str | Path, title: str) -> Path:
    """Reference against current, one panel per feature (`tunelab.evaluate.drift.Features`): confidence, length,
    pieces per word (histograms, as shares) and the predicted-label shares (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, name, what in [(axes[0], "confidence", "top-label probability"), (axes[1], "length", "characters"),
                           (axes[2], "fragmentation", "tokenizer pieces per word")]:
        a, b = getattr(reference, name), getattr(current, name)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        both = np.concatenate([a, b]) if len(a) + len(b) else np.zeros(1)
        bins = np.linspace(float(np.percentile(both, 0.5)), float(np.percentile(both, 99.5)) + 1e-9, 30)
        for values, lab in [(a, "reference"), (b, "current")]:
            if len(values):
                ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, alpha=0.55, label=lab,
                        weights=np.full(len(values), 1 / len(values)))
        ax.set_xlabel(what)
        ax.set_ylabel("share of texts")
    axes[0].legend()
    x = np.arange(len(labels))
    for offset, f, lab in [(-0.2, reference, "reference"), (0.2, current, "current")]:
        counts = np.bincount(f.label, minlength=len(labels))[:len(labels)]
        axes[3].bar(x + offset, counts / max(1, counts.sum()), width=0.4, label=lab)
    axes[3].set_xticks(x, labels, rotation=30, ha="right")
    axes[3].legend()
    axes[3].set_ylabel("share predicted")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png", metadata={"Software": "tunelab"})
    plt.close(fig)
    return path


def series_png(times: list[str], p_values: dict[str, list[float]], threshold: float, path: str | Path,
               title: str) -> Path:
    """Each statistic's p-value per window (log scale) with the drift threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(times))
    for name, ps in p_values.items():
        ax.plot(x, np.clip(np.asarray(ps, dtype=float), 1e-30, 1), marker="o", label=name)
    ax.axhline(threshold, color="red", linestyle="--", label="drift threshold")
    ax.set_yscale("log")
    ax.set_ylim(top=2)
    ax.set_xticks(x, times, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("p-value")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png", metadata={"Software": "tunelab"})
    plt.close(fig)
    return path
