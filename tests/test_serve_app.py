"""The app in-process, where faults can be injected: readiness while models load (S10), an engine error after
the first streamed chunk (S9), a bug in a route (500 without a trace); and the key ring and rate limiter."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.serve.app import create_app
from tunelab.serve.auth import KeyRing, RateLimiter, read_keys
from tunelab.serve.registry import check_specs

CHAT = {"model": "peaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}


def make_app(peaky_llama, **settings):
    cfg = ServeConfig(models=[f"peaky={peaky_llama}"], embedding_model=None, **settings)
    return create_app(cfg, check_specs(cfg.models, None), keys=[])


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while client.get("/ready").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.05)


def test_ready_is_503_while_loading_and_health_is_200(peaky_llama, monkeypatch):
    guard = make_app(peaky_llama)
    registry = guard.state.registry
    release = threading.Event()
    real_load = registry.load
    monkeypatch.setattr(registry, "load", lambda: (release.wait(30), real_load()))
    with TestClient(guard, base_url="http://localhost") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503 and client.get("/ready").json()["status"] == "loading"
        busy = client.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
        assert "Retry-After" in busy.headers
        release.set()
        wait_ready(client)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_engine_error_mid_stream_sends_an_error_event_then_done(peaky_llama):
    guard = make_app(peaky_llama)
    with TestClient(guard, base_url="http://localhost") as client:
        wait_ready(client)
        engine = guard.state.registry.models["peaky"].engine
        forward, calls = engine.model.forward, {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("device fell over")
            return forward(*args, **kwargs)

        engine.model.forward = failing
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 50, "stream": True}) as resp:
            lines = [ln for ln in resp.iter_lines() if ln]
        assert resp.status_code == 200
        assert json.loads(lines[1][6:])["choices"][0]["delta"]["content"] is not None  # tokens came first
        err = json.loads(lines[-2][6:])["error"]
        assert err["type"] == "server_error" and "device fell over" not in err["message"]
        assert lines[-1] == "data: [DONE]"
        engine.model.forward = forward
        ok = client.post("/v1/chat/completions", json=CHAT)  # the engine serves on
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_bug_is_a_500_envelope_without_a_trace(peaky_llama, monkeypatch):
    guard = make_app(peaky_llama)
    with TestClient(guard, raise_server_exceptions=False, base_url="http://localhost") as client:
        wait_ready(client)
        served = guard.state.registry.models["peaky"]
        monkeypatch.setattr(type(served), "chat_prompt", lambda self, m: 1 / 0)
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 500
        assert resp.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                         "code": None}}


def test_draining_refuses_new_requests(peaky_llama):
    guard = make_app(peaky_llama)
    with TestClient(guard, base_url="http://localhost") as client:
        wait_ready(client)
        guard.state.draining = True
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 503


def test_key_ring_accepts_only_its_keys():
    ring = KeyRing(["k" * 20, "j" * 20])
    assert ring.identify("Bearer " + "k" * 20) and ring.identify("Bearer " + "j" * 20)
    assert ring.identify("Bearer " + "k" * 20) != ring.identify("Bearer " + "j" * 20)
    for bad in (None, "", "Bearer ", "k" * 20, "Basic " + "k" * 20, "Bearer " + "k" * 19, "Bearer " + "k" * 21):
        assert ring.identify(bad) is None
    assert "k" * 20 not in ring.identify("Bearer " + "k" * 20)


def test_read_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_API_KEYS", "a" * 16 + ", " + "b" * 16)
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\n" + "c" * 16 + "\n\n")
    assert read_keys(f) == ["a" * 16, "b" * 16, "c" * 16]
    f.write_text("# none\n")
    monkeypatch.setenv("TUNELAB_API_KEYS", "")
    with pytest.raises(UserError, match="holds no keys"):
        read_keys(f)


def test_rate_limiter_bursts_then_waits(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("tunelab.serve.auth.time.monotonic", lambda: now[0])
    rl = RateLimiter(per_minute=60)  # 1/s, bursts of 10
    assert [rl.take("a") for _ in range(10)] == [0] * 10
    assert rl.take("a") == 1 and rl.take("b") == 0  # per key
    now[0] += 1.0
    assert rl.take("a") == 0 and rl.take("a") == 1
    assert RateLimiter(0).take("a") == 0  # off


@pytest.mark.parametrize("value,loopback", [("localhost", True), ("LOCALHOST:8000", True), ("app.localhost:1", True),
                                            ("127.0.0.1", True), ("127.8.9.10:80", True), ("[::1]", True),
                                            ("[::1]:8000", True), ("localhost.", True), ("::1", False),
                                            ("[::1", False), ("[::1]x", False), ("localhost:http", False),
                                            ("localhost.evil.example", False), ("127.0.0.1.nip.io", False),
                                            ("0.0.0.0", False), ("10.0.0.1", False), ("", False),
                                            ("[fe80::1]:80", False)])
def test_loopback_host_values(value, loopback):
    from tunelab.serve.auth import is_loopback_host

    assert is_loopback_host(value) is loopback


def test_streamed_echo_with_logprobs_equals_the_whole_answer(peaky_llama):
    body = {"model": "peaky", "prompt": "The café 今天 is", "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "echo": True, "n": 2}
    with TestClient(make_app(peaky_llama), base_url="http://localhost") as client:
        wait_ready(client)
        whole = client.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    for choice in whole.json()["choices"]:
        parts = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in parts) == choice["text"]
        assert parts[0]["text"] == "The café 今天 is"  # the prompt comes first, as its own chunk
        scored = [c["logprobs"] for c in parts if c["logprobs"]]
        want = choice["logprobs"]
        for key in ("tokens", "text_offset"):
            assert [v for s in scored for v in s[key]] == want[key]
        got = [v for s in scored for v in s["token_logprobs"]]
        assert got[0] is None and want["token_logprobs"][0] is None
        assert got[1:] == pytest.approx(want["token_logprobs"][1:], abs=1e-4)
        assert len(want["tokens"]) == len(whole.json()["choices"][0]["logprobs"]["tokens"])
        text = choice["text"]
        for token, at in zip(want["tokens"], want["text_offset"]):
            if not token.startswith("bytes:"):
                assert text[at:at + len(token)] == token
