import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import validate
from tunelab.errors import UserError
from tunelab.models import load_classifier
from tunelab.tasks.classification import ClassificationTask
from tunelab.train import checkpoint as ckpt
from tunelab.train.loop import accumulate_gradients, train

from conftest import make_rows, tiny_config


def _run(tmp_path, data, name="run", resume=None, **train_opts):
    cfg = validate(tiny_config(data, **train_opts))
    return train(cfg, tmp_path / name, resume=resume, show_progress=False), tmp_path / name


def _losses(run_dir):
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_accumulated_gradient_equals_full_batch_gradient():
    model, tok, _, _ = load_classifier("tiny-bert", ["negative", "neutral", "positive"])
    model.eval()  # no dropout: the two computations must see the same function
    task = ClassificationTask(tok, ["negative", "neutral", "positive"], 32)
    enc = task.encode(make_rows(10))
    window = [[0, 1, 2, 3, 4, 5, 6], [7, 8], [9]]  # unequal micro-batches
    loss_acc = accumulate_gradients(model, task, enc, window, "cpu")
    g_acc = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_full = accumulate_gradients(model, task, enc, [list(range(10))], "cpu")
    for a, p in zip(g_acc, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)


def test_loss_falls_and_run_dir_layout(tmp_path, small_dataset):
    # 16 epochs: trained to convergence (at 4 a tiny random BERT is often still near uniform)
    summary, run = _run(tmp_path, small_dataset, epochs=16, eval_every=40, keep_last=2)
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert summary["validation"]["macro_f1"] > 0.8
    for name in ("config.yaml", "metrics.jsonl", "model/tunelab.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())
    done = ckpt.complete_checkpoints(run / "checkpoints")
    assert 2 <= len(done) <= 3  # keep_last plus the best one
    for d in done:
        ckpt.verify(d)
    meta = json.loads((run / "model" / "tunelab.json").read_text())
    assert meta["labels"] == ["negative", "neutral", "positive"]
    assert meta["best_step"] == summary["best_step"] and meta["versions"]["torch"]


def test_same_seed_same_run(tmp_path, small_dataset):
    a, ra = _run(tmp_path, small_dataset, "a", max_steps=6)
    b, rb = _run(tmp_path, small_dataset, "b", max_steps=6)
    assert _losses(ra) == _losses(rb)
    wa, wb = load_file(ra / "model" / "model.safetensors"), load_file(rb / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_exactly(tmp_path, small_dataset):
    opts = dict(max_steps=12, eval_every=4, save_every=4, keep_last=5, grad_accum=2, batch_size=8)
    _, straight = _run(tmp_path, small_dataset, "straight", **opts)
    _, part = _run(tmp_path, small_dataset, "part", **opts)
    # Throw away everything after step 4, as if the run had died there, then resume.
    for d in ckpt.complete_checkpoints(part / "checkpoints"):
        if d.name != "step-4":
            import shutil

            shutil.rmtree(d)
    (part / "model").rename(part / "model-old")
    _run(tmp_path, small_dataset, "part", resume="auto", **opts)
    wa = load_file(straight / "model" / "model.safetensors")
    wb = load_file(part / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_config(tmp_path, small_dataset):
    _run(tmp_path, small_dataset, "r", max_steps=8, eval_every=4, save_every=4)
    with pytest.raises(UserError, match="train.lr"):
        _run(tmp_path, small_dataset, "r", resume="auto", max_steps=8, eval_every=4, save_every=4, lr=1e-4)
    with pytest.raises(UserError, match="no complete checkpoint"):
        _run(tmp_path, small_dataset, "empty", resume="auto")
    # --force resumes anyway and records what it let through
    (tmp_path / "r" / "model").rename(tmp_path / "r" / "model-old")
    cfg = validate(tiny_config(small_dataset, max_steps=8, eval_every=4, save_every=4, lr=1e-4))
    train(cfg, tmp_path / "r", resume="auto", force=True, show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("forced_changes") == ["train.lr"] for r in records)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "weights.safetensors").write_bytes(b"partial")
    assert ckpt.complete_checkpoints(root) == []
    assert (root / "step-3").exists()  # listing never deletes: another process may be writing it
    assert ckpt.clean_incomplete(root) == [root / "step-3"]  # the run's writer, holding the lock, cleans up
    assert not (root / "step-3").exists()


def test_early_stopping(tmp_path, small_dataset):
    summary, _ = _run(tmp_path, small_dataset, epochs=50, eval_every=1, lr=1e-9, early_stopping_patience=2)
    assert summary["steps"] < 10


def test_existing_run_is_not_overwritten_by_accident(tmp_path, small_dataset):
    _run(tmp_path, small_dataset, "r", max_steps=4, eval_every=2, save_every=2)
    with pytest.raises(UserError, match="already holds a run"):
        _run(tmp_path, small_dataset, "r", max_steps=4)
    cfg = validate(tiny_config(small_dataset, max_steps=2))
    summary = train(cfg, tmp_path / "r", overwrite=True, show_progress=False)
    # the old run's checkpoints are gone; the one left is the new run's last step (the old step-2 was not done)
    done = ckpt.complete_checkpoints(tmp_path / "r" / "checkpoints")
    assert summary["steps"] == 2 and [d.name for d in done] == ["step-2"]
    assert json.loads((done[0] / "loop_state.json").read_text())["loop"]["done"] is True
    assert len([r for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if "train_loss" in r]) == 1


def test_missing_dataset_message(tmp_path):
    cfg = validate(tiny_config(tmp_path / "nothing"))
    with pytest.raises(UserError, match="tunelab data prepare"):
        train(cfg, tmp_path / "run", show_progress=False)


def test_same_run_whatever_the_cache_holds(tmp_path, small_dataset, monkeypatch):
    """A cold cache builds tiny-bert during the run; that must not change the weights the seed gives."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    cfg = validate(tiny_config(small_dataset, max_steps=3, precision="fp32"))
    train(cfg, tmp_path / "cold", show_progress=False)
    assert list((tmp_path / "cache" / "models").glob("tiny-bert-*/model.safetensors"))
    train(cfg, tmp_path / "warm", show_progress=False)
    cold = load_file(tmp_path / "cold" / "model" / "model.safetensors")
    warm = load_file(tmp_path / "warm" / "model" / "model.safetensors")
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold)
