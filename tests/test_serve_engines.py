"""The engine follows the model: export dirs are served by ONNX Runtime (ONNX) and llama.cpp (GGUF), in-process
where faults can be injected; what cannot be served is refused before the server starts."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_rows
from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.serve.app import create_app
from tunelab.serve.engine import DoneEvent, ErrorEvent, SamplingParams, Sequence, TextEvent
from tunelab.serve.registry import check_specs, parse_spec


def serving(*models: str) -> TestClient:
    cfg = ServeConfig(models=list(models), embedding_model=None)
    return TestClient(create_app(cfg, check_specs(cfg.models, None), keys=[]), base_url="http://localhost")


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while client.get("/ready").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.05)


def test_export_dirs_choose_their_engine_and_the_rest_is_refused(tmp_path, classifier_onnx, peaky_gguf,
                                                                 tiny_classifier):
    from tunelab.export import export_model

    onnx, gguf = parse_spec(str(classifier_onnx)), parse_spec(f"chat={peaky_gguf}")
    assert (onnx.id, onnx.kind, onnx.engine) == ("sentiment", "classify", "onnxruntime")
    assert (gguf.id, gguf.kind, gguf.engine) == ("chat", "generate", "llama.cpp")
    assert parse_spec(str(tiny_classifier)).engine == "pytorch"
    export_model(str(tiny_classifier), tmp_path / "hf", "hf", rows=4)
    with pytest.raises(UserError, match="serve the model dir it came from"):
        parse_spec(str(tmp_path / "hf"))
    bare = tmp_path / "bare"
    shutil.copytree(peaky_gguf, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        parse_spec(str(bare))
    (bare / "model.gguf").unlink()
    with pytest.raises(UserError, match="without its model.gguf"):
        parse_spec(str(bare))


def test_an_int8_onnx_classifier_serves_what_the_model_dir_predicts(tmp_path, tiny_classifier):
    from tunelab.export import export_model
    from tunelab.export.onnx import OnnxEncoder
    from tunelab.models import load_model_dir

    export_model(str(tiny_classifier), tmp_path / "int8", "onnx", quantize="int8", rows=4, thresholds={})
    model, tok, _ = load_model_dir(tiny_classifier)
    onnx = OnnxEncoder(tmp_path / "int8" / "model.onnx")
    texts = [r["text"] for r in make_rows(40, seed=7, start=2000)]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
    got = onnx(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert got.dtype == torch.float32 and got.shape == want.shape + (3,)  # negative, neutral, positive
    assert (got.argmax(-1) == want).float().mean() >= 0.9  # int8: a few borderline rows may flip
    with serving(f"sentiment={tmp_path / 'int8'}") as client:
        wait_ready(client)
        resp = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
        assert resp.status_code == 200, resp.text
        labels = [d["label"] for d in resp.json()["data"]]
        assert labels == [load_model_dir(tiny_classifier)[2]["labels"][i] for i in got.argmax(-1).tolist()]
        assert client.get("/v1/models").json()["data"][0]["tunelab_engine"] == "onnxruntime"


def _sequence(events: list, max_tokens: int = 8, **params) -> Sequence:
    return Sequence([504, 3575, 282, 4649, 314], SamplingParams(max_tokens=max_tokens, temperature=0, **params),
                    events.append)


def _wait(seqs: list[Sequence], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all(s.finished for s in seqs):
        assert time.time() < deadline, "the llama.cpp engine did not finish"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def llama(peaky_gguf):
    from tunelab.serve.llamacpp import LlamaCppEngine, gguf_context

    assert gguf_context(peaky_gguf / "model.gguf") == 2048
    engine = LlamaCppEngine(peaky_gguf / "model.gguf", slots=2, context=256, max_waiting=1, name="peaky")
    yield engine
    engine.close()


def test_llama_cpp_engine_streams_counts_and_stops_at_a_stop_string(llama):
    events: list = []
    s = _sequence(events)
    llama.submit([s])
    _wait([s])
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "length" and done.completion_tokens == 8
    assert done.prompt_tokens == 5 and len(text) > 8
    stop = text[4:7]
    cut: list = []
    s = _sequence(cut, stop=[stop])
    llama.submit([s])
    _wait([s])
    assert "".join(e.text for e in cut if isinstance(e, TextEvent)) == text[:text.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_llama_cpp_engine_admits_slots_plus_waiting_and_a_cancel_frees_the_slot(llama):
    from tunelab.serve.engine import EngineFull

    events = [[] for _ in range(4)]
    seqs = [_sequence(e, max_tokens=1500) for e in events[:3]]
    llama.submit(seqs)  # 2 slots + 1 waiting
    with pytest.raises(EngineFull):
        llama.submit([_sequence(events[3])])
    deadline = time.time() + 30
    while not all(any(isinstance(e, TextEvent) for e in ev) for ev in events[:2]):
        assert time.time() < deadline
        time.sleep(0.02)
    llama.cancel(seqs)
    _wait(seqs)
    assert all(not any(isinstance(e, (DoneEvent, ErrorEvent)) for e in ev) for ev in events[:3])  # silence
    assert sum(isinstance(e, TextEvent) for e in events[0]) < 1000  # stopped early, not run to the end
    assert llama.load() == (0, 0)


def test_llama_cpp_failures_end_one_sequence_with_an_error(llama, monkeypatch):
    class Refusing:
        def handle_completions(self, request, callback):  # llama.cpp answers an error as the stream's only chunk
            callback({"error": {"code": 400, "message": "Prompt contains invalid tokens"}})

    real = llama.server
    monkeypatch.setattr(llama, "server", Refusing())
    events: list = []
    s = _sequence(events)
    llama.submit([s])
    _wait([s])
    assert events == [ErrorEvent("Prompt contains invalid tokens")]

    def broken_sink(event):
        raise RuntimeError("a bug in the route")

    monkeypatch.setattr(llama, "server", real)
    s = Sequence([504, 3575], SamplingParams(max_tokens=4, temperature=0), broken_sink)
    llama.submit([s])
    _wait([s])  # the worker survives a sink that raises; the engine goes on serving
    events = []
    s = _sequence(events, max_tokens=2)
    llama.submit([s])
    _wait([s])
    assert isinstance(events[-1], DoneEvent)


def test_close_ends_what_is_in_flight_with_a_shutdown_error(peaky_gguf):
    from tunelab.serve.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(peaky_gguf / "model.gguf", slots=1, context=2048, max_waiting=2, name="peaky")
    events = [[] for _ in range(3)]
    seqs = [_sequence(e, max_tokens=1500) for e in events]
    engine.submit(seqs)
    deadline = time.time() + 30
    while not any(events):  # llama.cpp picks which of the three takes its one slot first
        assert time.time() < deadline
        time.sleep(0.02)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(10)
    _wait(seqs)
    assert all(isinstance(ev[-1], ErrorEvent) and ev[-1].shutdown for ev in events)
    with pytest.raises(Exception, match="shutting down"):
        engine.submit([_sequence([])])


def test_seeded_sampling_in_llama_cpp_is_reproducible(llama):
    def sample(seed):
        events: list = []
        s = Sequence([504, 3575, 282], SamplingParams(max_tokens=12, temperature=1.0, seed=seed), events.append)
        llama.submit([s])
        _wait([s])
        return "".join(e.text for e in events if isinstance(e, TextEvent))

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1
