"""Training under faults: non-finite losses, out of memory, signals, kill -9 (T1, T4, T5, T6)."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.config import validate
from tunelab.errors import UserError
from tunelab.tasks.classification import ClassificationTask
from tunelab.train import checkpoint as ckpt
from tunelab.train.loop import train

from conftest import tiny_config

REAL_LOSS = ClassificationTask.loss_sum


def _run(tmp_path, data, name="run", **train_opts):
    cfg = validate(tiny_config(data, **train_opts))
    return train(cfg, tmp_path / name, show_progress=False), tmp_path / name


def _poison(monkeypatch, bad_calls):
    """The loss of the listed forward calls (1-based) is NaN."""
    calls = {"n": 0}

    def loss_sum(self, model, batch):
        calls["n"] += 1
        loss = REAL_LOSS(self, model, batch)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint(tmp_path, small_dataset, monkeypatch):
    _poison(monkeypatch, {5})
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 5 .*last good checkpoint: .*step-4"):
        _run(tmp_path, small_dataset, max_steps=8, save_every=2, eval_every=0)
    for d in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints"):
        w = load_file(d / "weights.safetensors")
        assert all(torch.isfinite(t).all() for t in w.values())


def test_nonfinite_skip_counts_and_stops_after_k_in_a_row(tmp_path, small_dataset, monkeypatch):
    _poison(monkeypatch, {3})
    out, run = _run(tmp_path, small_dataset, max_steps=6, on_nonfinite="skip")
    assert out["nonfinite_skipped"] == 1 and out["steps"] == 6
    w = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        _run(tmp_path, small_dataset, "again", max_steps=10, on_nonfinite="skip", max_nonfinite_in_row=3)


def _fake_oom_above(monkeypatch, limit):
    def loss_sum(self, model, batch):
        if batch["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return REAL_LOSS(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)


def test_out_of_memory_names_the_knobs_and_writes_no_checkpoint(tmp_path, small_dataset, monkeypatch):
    _fake_oom_above(monkeypatch, 4)
    with pytest.raises(UserError, match=r"out of memory at step 1 .*train.batch_size.*gradient_checkpointing"):
        _run(tmp_path, small_dataset, max_steps=4, save_every=1)
    assert ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_auto_batch_size_splits_and_keeps_the_gradient(tmp_path, small_dataset, monkeypatch):
    from tunelab.data.dataset import load_split
    from tunelab.models import load_classifier
    from tunelab.train.loop import accumulate_gradients

    model, tok, _, _ = load_classifier("tiny-bert", ["negative", "neutral", "positive"])
    model.eval()  # no dropout: the split changes the masks' random draws, not the maths
    task = ClassificationTask(tok, ["negative", "neutral", "positive"], 32)
    enc = task.encode(load_split(small_dataset, "train")[:32])
    window = [list(range(16)), list(range(16, 32))]
    grads = []
    for split in (1, 4):
        model.zero_grad()
        accumulate_gradients(model, task, enc, window, "cpu", "fp32", split)
        grads.append(model.classifier.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

    _fake_oom_above(monkeypatch, 4)
    out, _ = _run(tmp_path, small_dataset, "split", max_steps=4, precision="fp32", auto_batch_size=True)
    assert out["steps"] == 4


# ---- subprocess: signals and kill -9 -------------------------------------------------------------

def _config_file(tmp_path, data, **train_opts):
    # 200 steps: long enough that a signal sent after a few steps always lands before the end, even on a slow machine
    cfg = tiny_config(data, **{"max_steps": 200, "save_every": 3, "eval_every": 0, "keep_last": 2, "batch_size": 8,
                               "grad_accum": 2, "precision": "fp32", "num_threads": 1, **train_opts})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _logged_step(out) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


def _wait_for_step(out, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _logged_step(out) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


def _weights(run):
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("straight")
    cfg = _config_file(root, small_dataset)
    proc = _start(cfg, root / "run")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return cfg, _weights(root / "run")


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, straight):
    cfg, expected = straight
    out = tmp_path / "run"
    proc = _start(cfg, out)
    _wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped" in stderr and "SIGTERM" in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] < 200
    assert ckpt.complete_checkpoints(out / "checkpoints")[-1].name == f"step-{summary['steps']}"
    # the hint is the exact command: run as printed (no config given), from another folder
    hint = shlex.split(stderr.split("continue with: ")[1].splitlines()[0])
    assert hint[:2] == ["tunelab", "train"] and "--resume" in hint
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "tunelab", *hint[1:]], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    got = _weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_kill_9_at_random_moments_then_resume_matches_straight_run(tmp_path, straight):
    cfg, expected = straight
    out = tmp_path / "run"
    rng = random.Random(0)
    proc = _start(cfg, out)
    for _ in range(3):  # kill -9 three times at random moments of training (saves happen every 3 steps)
        _wait_for_step(out, _logged_step(out) + 1, proc)  # this process is training, past its start-up
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
        resume = ["--resume", "auto"] if ckpt.complete_checkpoints(out / "checkpoints") else ["--overwrite"]
        proc = _start(cfg, out, *resume)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    got = _weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_second_writer_is_refused_naming_the_first_and_the_first_run_is_unharmed(tmp_path, small_dataset):
    cfg = _config_file(tmp_path, small_dataset, max_steps=100_000)  # runs until stopped below
    out = tmp_path / "run"
    first = _start(cfg, out)
    _wait_for_step(out, 2, first)
    seconds = [_start(cfg, out, *extra) for extra in (["--overwrite"], ["--resume", "auto"], [])]
    for second in seconds:
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert f"being written by another tunelab process (PID {first.pid} " in err and "Traceback" not in err
    assert first.poll() is None  # still training, untouched
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    done = ckpt.complete_checkpoints(out / "checkpoints")
    assert done and done[-1].name == f"step-{json.loads(stdout)['steps']}"
    for d in done:
        ckpt.verify(d)


def _signal_on_call(monkeypatch, owner, name, call):
    """SIGTERM to this process on the `call`-th call (1-based) of owner.name, then the real call."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("where", ["final evaluation", "final save"])
def test_sigterm_during_the_final_phase_leaves_a_checkpoint_of_the_last_step(tmp_path, small_dataset, monkeypatch,
                                                                             where):
    import tunelab.model_files

    opts = dict(max_steps=4, save_every=3, eval_every=0, precision="fp32")
    straight, _ = _run(tmp_path, small_dataset, "straight", **opts)
    expected = _weights(tmp_path / "straight")
    if where == "final evaluation":  # the only evaluation of this run is at its last step
        _signal_on_call(monkeypatch, ClassificationTask, "evaluate", 1)
    else:  # while the model dir's files are being written
        _signal_on_call(monkeypatch, tunelab.model_files, "files_manifest", 1)
    stopped, run = _run(tmp_path, small_dataset, **opts)
    assert stopped["interrupted"] == "SIGTERM" and stopped["steps"] == 4
    assert stopped["checkpoint"].endswith("step-4")
    assert not (run / "model").exists() and not list(run.glob(".model.tunelab-*"))
    monkeypatch.undo()
    done = train(validate(tiny_config(small_dataset, **opts)), run, resume="auto", show_progress=False)
    assert done["steps"] == 4 and done["validation"] == straight["validation"]
    got = _weights(run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, small_dataset, capsys):
    opts = dict(max_steps=6, save_every=2, eval_every=0, keep_last=3, precision="fp32")
    _, run = _run(tmp_path, small_dataset, **opts)
    expected = _weights(run)
    newest = ckpt.complete_checkpoints(run / "checkpoints")[-1]
    (newest / "manifest.json").write_text("{this is not json")
    older = ckpt.complete_checkpoints(run / "checkpoints")[-2]
    w = older / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])  # truncated: does not match its manifest
    (run / "model").rename(run / "model-first")
    with pytest.raises(UserError, match="manifest.json is malformed"):
        train(validate(tiny_config(small_dataset, **opts)), run, resume=str(newest), show_progress=False)
    capsys.readouterr()
    summary = train(validate(tiny_config(small_dataset, **opts)), run, resume="auto", show_progress=False)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest} is damaged" in err and f"skipping checkpoint {older} is damaged" in err
    assert "resumed from" in err and "step-2 at step 2" in err
    assert summary["steps"] == 6
    got = _weights(run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
