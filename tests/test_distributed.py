"""torchrun with 2 processes (gloo on CPU) == 1 process with the same global batch (T8)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import task_config

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _config(tmp_path, data):
    cfg = task_config(data, "tiny-llama", "full", max_steps=6, batch_size=8, grad_accum=2, lr=1e-3,
                      precision="fp32", num_threads=1, eval_every=3, save_every=3, log_every=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _losses(run):
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.mark.skipif(not shutil.which(str(TORCHRUN)), reason="torchrun not installed")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, text_data):
    cfg = _config(tmp_path, text_data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "tunelab", "train", str(cfg),
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('"model_dir"') == 1  # rank 0 alone reports
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert all(abs(x - y) < 1e-4 * max(1, abs(x)) for x, y in zip(a, b)), (a, b)
    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # rank 0 wrote the checkpoints; resuming the two-process run from one works like any other
    assert (tmp_path / "two" / "checkpoints" / "step-3" / "manifest.json").is_file()


@pytest.mark.skipif(not shutil.which(str(TORCHRUN)) or not shutil.which("pgrep"), reason="torchrun/pgrep missing")
def test_a_dead_worker_stops_the_job(tmp_path, text_data):
    import time

    cfg = _config(tmp_path, text_data)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"].update(max_steps=100000, dist_timeout_s=60)
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "tunelab", "train",
                            str(cfg), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    try:
        while not (out / "metrics.jsonl").is_file() and time.time() - t0 < 120 and job.poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").is_file(), "training never started (no metrics.jsonl in 120 s)"
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), 9)
        rc = job.wait(timeout=120)  # torchrun notices the dead worker and stops the other
    finally:
        job.kill()
    assert rc != 0


@pytest.mark.skipif(not shutil.which(str(TORCHRUN)), reason="torchrun not installed")
def test_fsdp2_matches_one_process_and_resumes(tmp_path, text_data):
    """FSDP2 (fully_shard) on CPU/gloo: same losses and weights as one process; a resumed sharded run
    ends where a straight one does."""
    cfg = _config(tmp_path, text_data)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["distributed"] = "fsdp"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *extra, ranks=2):
        cmd = ([str(TORCHRUN), "--standalone", "--nproc_per_node", str(ranks), "-m"] if ranks > 1
               else [sys.executable, "-m"]) + ["tunelab", "train", str(cfg), "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "one", ranks=1)
    run(tmp_path / "fsdp")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert all(abs(x - y) < 1e-4 * max(1, abs(x)) for x, y in zip(a, b)), (a, b)
    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # resume the sharded run from its step-3 checkpoint
    shutil.rmtree(tmp_path / "fsdp" / "model")
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-6", ignore_errors=True)
    run(tmp_path / "fsdp", "--resume", str(tmp_path / "fsdp" / "checkpoints" / "step-3"))
    wc = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert all(torch.allclose(wb[k], wc[k], atol=1e-6) for k in wb)
