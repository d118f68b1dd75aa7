"""`tunelab serve` and `tunelab generate` on a user's mistakes: one line `error: …`, exit 2, no traceback — a run
dir instead of its model, a model that fails to load, a model that cannot generate, a port in use — and an
unsupported `response_format` answered 400 naming it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from tunelab.models import tiny_model_dir
from tunelab.config import ServeConfig
from tunelab.serve.app import create_app
from tunelab.serve.registry import check_specs


def tunelab(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_API_KEYS": ""}
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ---- a run dir instead of its model; a model that fails to load ------------------------------------------

@pytest.mark.parametrize("layout", ["run", "old-run"])
def test_serve_refuses_a_run_dir_before_the_banner_and_names_its_model(tmp_path, tiny_classifier, layout):
    run = tiny_classifier.parent  # runs/NAME: tunelab.json (kind: run), config.yaml, metrics.jsonl, model/
    if layout == "old-run":  # written before run dirs carried a tunelab.json
        run = tmp_path / "runs" / "old"
        (run / "model").mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy(tiny_classifier.parent / name, run / name)
    proc = tunelab("serve", run, "--port", "0", "--embedding-model", "none", cwd=tmp_path)
    assert one_line_error(proc) == f"error: {run} is a run dir; serve its model: {run / 'model'}"
    assert proc.stdout == ""  # refused before the banner


def test_a_model_that_fails_to_load_exits_2_with_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_model_dir("tiny-llama") / "config.json", broken)  # a decoder's config, no tokenizer or weights
    proc = tunelab("serve", broken, "--port", "0", "--embedding-model", "none", cwd=tmp_path)
    one_line_error(proc, f"{broken}: the tokenizer files are missing")
    assert "tunelab serving on" in proc.stdout  # it got as far as loading, in the background


# ---- generation on a model that is not a generator -----------------------------------------------------

@pytest.mark.parametrize("which", ["encoder", "classifier", "ner"])
def test_generate_refuses_a_model_that_is_not_a_causal_lm(tmp_path, tiny_classifier, tiny_ner, which):
    ref, fragments = {
        "encoder": ("builtin:minilm-l6", ["builtin:minilm-l6 is an encoder (bert), not a text generator",
                                          "`tunelab serve builtin:minilm-l6` gives its embeddings"]),
        "classifier": (tiny_classifier, [f"{tiny_classifier} is a classification model dir", "`tunelab predict`"]),
        "ner": (tiny_ner, [f"{tiny_ner} is a token_classification model dir", "`tunelab predict`"]),
    }[which]
    one_line_error(tunelab("generate", ref, "hi", cwd=tmp_path), *fragments)


def test_serve_routes_each_model_by_what_it_is(tiny_classifier, peaky_llama):
    """A classifier model dir is served for /v1/classify and an encoder for embeddings, never for generation."""
    bert_dir = tiny_model_dir("tiny-bert")  # an HF BERT dir, not a built-in name
    specs = check_specs([f"clf={tiny_classifier}", f"bert={bert_dir}", f"peaky={peaky_llama}"], None)
    assert {s.id: s.kind for s in specs} == {"clf": "classify", "bert": "embed", "peaky": "generate"}


# ---- response_format ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(peaky_llama):
    cfg = ServeConfig(models=[f"peaky={peaky_llama}"], embedding_model=None)
    with TestClient(create_app(cfg, check_specs(cfg.models, None), keys=[]), base_url="http://localhost") as c:
        deadline = time.time() + 60
        while c.get("/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        yield c


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
@pytest.mark.parametrize("fmt", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                                 "json", {}, {"type": 3}, []])
def test_response_format_other_than_text_is_refused(client, path, body, fmt):
    resp = client.post(path, json={"model": "peaky", "max_tokens": 2, **body, "response_format": fmt})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("response_format: only {\"type\": \"text\"} is supported")


@pytest.mark.parametrize("extra", [{}, {"response_format": {"type": "text"}}, {"response_format": None}])
def test_response_format_text_or_absent_is_served(client, extra):
    body = {"model": "peaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length", resp.text


# ---- the port ------------------------------------------------------------------------------------------------

def test_a_port_in_use_is_one_line_before_the_banner(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = tunelab("serve", "tiny-llama", "--port", port, "--embedding-model", "none", cwd=tmp_path)
    line = one_line_error(proc, f"port {port} on 127.0.0.1 is already in use")
    assert line.startswith(f"error: port {port} on 127.0.0.1 is already in use (") and proc.stdout == ""
