"""PNG plots (matplotlib, Agg backend): the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# matplotlib is imported inside confusion_matrix_png (~0.7 s): only a report that draws its PNG pays it.


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
