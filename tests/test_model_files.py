"""Broken and hostile model files (X1, X3): one clear error naming the file, never a traceback or an unpickle."""

import json
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import UserError
from tunelab.models import load_classifier, load_model_dir, save_model_dir

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny-bert classifier model dir, saved the way `tunelab train` saves one."""
    model, tok, _, _ = load_classifier("tiny-bert", LABELS)
    meta = {"task": "classification", "labels": LABELS, "base": {"ref": "tiny-bert"}, "method": {"name": "full"},
            "max_length": 32, "data": {"dir": "x", "fingerprint": "f", "train_examples": 0}}
    d = tmp_path_factory.mktemp("saved") / "model"
    save_model_dir(model, tok, d, meta)
    return d


@pytest.fixture
def copy(saved, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(saved, d)
    return d


def _drop_manifest(d):
    """As if the file came from elsewhere (another tool, an older tunelab): no sizes or hashes to compare."""
    meta = json.loads((d / "tunelab.json").read_text())
    meta.pop("files")
    (d / "tunelab.json").write_text(json.dumps(meta))


def test_the_saved_dir_records_its_weight_files_and_loads(saved):
    meta = json.loads((saved / "tunelab.json").read_text())
    assert meta["kind"] == "model" and set(meta["files"]) == {"model.safetensors"}
    load_model_dir(saved)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_a_truncated_weights_file_is_named(copy, keep):
    w = copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    _drop_manifest(copy)
    with pytest.raises(UserError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        load_model_dir(copy)


def test_a_header_claiming_huge_length_is_caught_without_reading_it(copy):
    w = copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[:8] = (1 << 60).to_bytes(8, "little")
    w.write_bytes(bytes(data))
    _drop_manifest(copy)
    with pytest.raises(UserError, match="header length"):
        load_model_dir(copy)


def test_changed_bytes_are_caught_by_the_recorded_hash(copy):
    w = copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: the header still parses
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors does not match the size and sha256"):
        load_model_dir(copy)


def test_non_finite_weights_are_named(copy):
    w = copy / "model.safetensors"
    tensors = load_file(w)
    name = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    tensors[name][0] = float("nan")
    save_file(tensors, w, metadata={"format": "pt"})
    _drop_manifest(copy)
    with pytest.raises(UserError, match=rf"tensor {name} has 1 non-finite values"):
        load_model_dir(copy)


def test_a_missing_tokenizer_file_is_named(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer files are missing"):
        load_model_dir(copy)


def test_a_corrupt_config_is_one_message(copy):
    (copy / "config.json").write_text("{oops")
    with pytest.raises(UserError, match=r"config\.json is corrupt"):
        load_model_dir(copy)


class _Payload:
    """Unpickling this runs a command: the file it creates proves a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(d, name, marker):
    with open(d / name, "wb") as f:
        pickle.dump(_Payload(marker), f)


def test_pickled_weights_are_refused_never_unpickled(copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / "model.safetensors").unlink()
    _plant_pickle(copy, "pytorch_model.bin", marker)
    _drop_manifest(copy)
    with pytest.raises(UserError, match=r"pytorch_model\.bin is a pickle file; tunelab loads safetensors"):
        load_model_dir(copy)
    assert not marker.exists()


def test_a_pickle_beside_safetensors_is_never_read(copy, tmp_path):
    marker = tmp_path / "pwned"
    _plant_pickle(copy, "pytorch_model.bin", marker)
    load_model_dir(copy)
    assert not marker.exists()


def test_a_base_model_dir_with_only_a_pickle_is_refused(tmp_path):
    from tunelab.models import resolve_base

    base = tmp_path / "base"
    shutil.copytree(resolve_base("tiny-bert").path, base)
    (base / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _plant_pickle(base, "pytorch_model.bin", marker)
    with pytest.raises(UserError, match="pickle file"):
        load_classifier(str(base), LABELS)
    assert not marker.exists()


def test_cli_prints_one_line_for_a_broken_model_dir(copy):
    import subprocess
    import sys

    w = copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(copy), "hello"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "model.safetensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.integration
def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch, peaky_gguf):
    """Two GGUF files with the same name and size but different bytes load different weights. (A tiny Llama's
    GGUF, and no tokenizer conversion — building 49k tokens from GGUF takes most of a minute and is not the point.)"""
    import transformers
    from gguf import GGUFReader

    from tunelab.models import resolve_base

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: SimpleNamespace(save_pretrained=lambda path: None))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))  # these tokenizer-less builds stay here
    src = peaky_gguf / "model.gguf"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    tensor = next(t for t in GGUFReader(b).tensors if t.name == "blk.0.ffn_down.weight")
    with open(b, "r+b") as f:  # change one byte of a quantised block's values (not its header)
        f.seek(int(tensor.data_offset) + 8)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))
    assert a.stat().st_size == b.stat().st_size
    da, db = resolve_base(str(a)).path, resolve_base(str(b)).path
    assert da != db
    wa, wb = load_file(da / "model.safetensors"), load_file(db / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(wa[key], wb[key])
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k != key)


def test_a_truncated_gguf_is_one_message(tmp_path):
    from tunelab.assets import builtin_path
    from tunelab.models import resolve_base

    src = builtin_path("builtin:smollm2-135m-instruct")
    bad = tmp_path / "half.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(UserError, match=r"half\.gguf: not a readable GGUF file"):
        resolve_base(str(bad))
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        resolve_base(str(bad))


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path):
    model, tok, _, _ = load_classifier("tiny-bert", LABELS)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    meta = {"task": "classification", "labels": LABELS, "base": {"ref": "tiny-bert"}, "method": {"name": "full"}}
    with pytest.raises(UserError, match="classifier.weight has 1 non-finite values"):
        save_model_dir(model, tok, tmp_path / "model", meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]
