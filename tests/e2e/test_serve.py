"""`tunelab serve` as a black box in a subprocess: the official `openai` client, raw bad bodies, keys,
limits, concurrency, disconnects, metrics and SIGTERM (RELIABILITY.md S1–S14) — each against the PyTorch engine
(model dirs, base models) and against the exported engines (a GGUF export in llama.cpp, ONNX exports in ONNX
Runtime), under the same model ids."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tunelab.train.precision import resolve_precision

from conftest import make_rows
from serve_process import KEY, OTHER_KEY, THIRD_KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "peaky", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0}


ENGINES = {"pytorch": {"peaky": "pytorch", "sentiment": "pytorch", "minilm-l6": "pytorch"},
           "exported": {"peaky": "llama.cpp", "sentiment": "onnxruntime", "minilm-l6": "onnxruntime"}}


@pytest.fixture(scope="module", params=list(ENGINES))
def engines(request) -> str:
    return request.param


def peaky_model(request, engines: str) -> str:
    return f"peaky={request.getfixturevalue('peaky_llama' if engines == 'pytorch' else 'peaky_gguf')}"


@pytest.fixture(scope="module")
def server(request, engines, tmp_path_factory, tiny_classifier, sft_lora):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    encoders = [str(tiny_classifier)] if engines == "pytorch" else [
        f"sentiment={request.getfixturevalue('classifier_onnx')}",
        f"minilm-l6={request.getfixturevalue('minilm_onnx')}"]
    srv = ServerProcess([peaky_model(request, engines), *encoders, f"chat-a={sft_lora}", f"chat-b={sft_lora}",
                         "--max-batch", "8", "--max-waiting", "32", "--max-body-bytes", "200000",
                         "--rate-limit", "0"], log,  # unlimited: this module sends hundreds of requests at once
                        env={"TUNELAB_API_KEYS": KEY})
    yield srv
    assert srv.stop() == 0
    log_text = log.read_text()
    assert KEY not in log_text and "Traceback" not in log_text  # S7, S8: keys never logged; no bug hit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, headers=AUTH, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kw)


def assert_envelope(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in err["message"] and "/tmp" not in err["message"] and KEY not in err["message"]
    return err


# ---- the happy paths with the official client (S14) ---------------------------------------------------
def test_banner_names_models_and_snippets(server):
    text = "".join(server.lines)
    assert "peaky" in text and "sentiment" in text and "minilm-l6" in text
    assert "curl " in text and "openai.OpenAI(" in text


def test_models_lists_everything_served(client, engines):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"peaky", "sentiment", "chat-a", "chat-b", "minilm-l6"}
    assert client.models.retrieve("peaky").id == "peaky"
    assert {k: ids[k].tunelab_engine for k in ENGINES[engines]} == ENGINES[engines]
    assert ids["chat-a"].tunelab_engine == "pytorch"  # LoRA adapters sharing a base stay on the PyTorch engine
    native = resolve_precision("auto", "cpu")  # bf16 where this CPU has it natively, else fp32
    assert ids["chat-a"].tunelab_precision == native
    assert {k: ids[k].tunelab_precision for k in ENGINES[engines]} == {
        k: native if engine == "pytorch" else None for k, engine in ENGINES[engines].items()}


def test_chat_non_streaming_and_streaming_agree(client):
    kw = dict(model="peaky", messages=CHAT["messages"], max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_completions_n_seed_and_stop(client):
    res = client.completions.create(model="peaky", prompt="Once upon a time", max_tokens=10, n=2,
                                    temperature=0.8, seed=3)
    assert [c.index for c in res.choices] == [0, 1] and all(c.text for c in res.choices)
    again = client.completions.create(model="peaky", prompt="Once upon a time", max_tokens=10, n=2,
                                      temperature=0.8, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in res.choices]  # seeded: reproducible
    greedy = client.completions.create(model="peaky", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model="peaky", prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_and_token_id_prompts_through_the_official_client(client, engines):
    kw = dict(model="peaky", messages=CHAT["messages"], max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert content and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob for e in content)
    assert all(e.token == e.top_logprobs[0].token for e in content)  # greedy: the most likely token is taken
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    if engines == "pytorch":  # one entry per generated token (an end-of-turn token too); their bytes are the answer
        assert len(content) == full.usage.completion_tokens
        text = content[:-1] if full.choices[0].finish_reason == "stop" else content
        assert bytes(b for e in text for b in e.bytes).decode() == full.choices[0].message.content
    else:  # llama.cpp: one entry per streamed piece
        assert 0 < len(content) <= full.usage.completion_tokens

    ids = [[504, 3575, 282, 4649, 314], [19556, 253, 1012]]  # token ids: two prompts in one request
    res = client.completions.create(model="peaky", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    assert [c.index for c in res.choices] == [0, 1] and res.usage.prompt_tokens == 8
    for c in res.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
        assert all(len(top) <= 3 and max(top.values()) == p for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    prompt_text = "The capital of France is"
    if engines == "pytorch":  # lm-eval's scoring request: echo, one token, the prompt's log-probabilities
        echo = client.completions.create(model="peaky", prompt=ids[0], max_tokens=1, temperature=0, logprobs=1,
                                         echo=True)
        lp = echo.choices[0].logprobs
        assert echo.choices[0].text.startswith(prompt_text) and len(lp.tokens) == 6
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[:2] == [0, 3]
        assert all(p < 0 for p in lp.token_logprobs[1:])
        scored = client.completions.create(model="peaky", prompt=ids[0], max_tokens=0, logprobs=0, echo=True)
        assert scored.choices[0].text == prompt_text and scored.usage.completion_tokens == 0
        assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:5], abs=1e-3)
    else:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="peaky", prompt=ids[0], max_tokens=1, logprobs=1, echo=True)
        assert err.value.param == "echo" and "llama.cpp" in err.value.message
        echo = client.completions.create(model="peaky", prompt=ids[0], max_tokens=0, echo=True)  # no scores: fine
        assert echo.choices[0].text == prompt_text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="peaky", prompt=[[1, 2, 10 ** 6]], max_tokens=2)
    assert err.value.param == "prompt" and "vocabulary" in err.value.message


def test_tokenizer_routes_are_the_served_models(server, client):
    text = "The café 你好 — words"
    got = post(server, "/tokenize", {"model": "peaky", "prompt": text, "add_special_tokens": False})
    assert got.status_code == 200, got.text
    ids = got.json()["tokens"]
    assert got.json()["count"] == len(ids) > 0 and got.json()["max_model_len"] == 2048
    back = post(server, "/detokenize", {"model": "peaky", "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    chat = post(server, "/tokenize", {"model": "peaky", "messages": CHAT["messages"]}).json()
    answer = client.chat.completions.create(model="peaky", messages=CHAT["messages"], max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens  # the same template and tokenizer as generation
    info = httpx.get(server.url + "/tokenizer_info", params={"model": "peaky"}, headers=AUTH)
    assert info.status_code == 200 and info.json()["eos_token"] and "im_start" in info.json()["chat_template"]
    # several generation models are served here: a request must name one
    assert_envelope(post(server, "/tokenize", {"prompt": text}), 400, param="model")
    assert_envelope(httpx.get(server.url + "/tokenizer_info", headers=AUTH), 400, param="model")
    assert_envelope(post(server, "/tokenize", {"model": "sentiment", "prompt": text}), 400, param="model")
    assert_envelope(post(server, "/tokenize", {"model": "peaky"}), 400, param="prompt")
    assert_envelope(post(server, "/detokenize", {"model": "peaky", "tokens": [1, 10 ** 7]}), 400, param="tokens")
    assert_envelope(post(server, "/detokenize", {"model": "peaky", "tokens": ["a"]}), 400, param="tokens")


def test_lora_models_share_a_base_and_stop_at_their_end_token(client, server):
    for model in ("chat-a", "chat-b"):
        res = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "what is 2 plus 2?"}],
                                             max_tokens=40, temperature=0)
        assert "<|im_end|>" not in res.choices[0].message.content
    assert "shared base" in server.log.read_text()


def test_embeddings_float_and_base64(client):
    res = client.embeddings.create(model="minilm-l6", input=["the cat sat", "a cat was sitting", "stock prices"])
    vecs = [d.embedding for d in res.data]  # the client asks for base64 and decodes it
    assert len(vecs) == 3 and len(vecs[0]) == 384
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert abs(dot(vecs[0], vecs[0]) - 1) < 1e-4
    assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2])  # real sentence embeddings
    flt = client.embeddings.create(model="minilm-l6", input="the cat sat", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(flt.data[0].embedding, vecs[0])) < 1e-6


def test_classify(server):
    # held-out rows in the training format (the tiny classifier is only reliable on that shape)
    rows = make_rows(6, seed=99, start=1000)
    resp = post(server, "/v1/classify", {"model": "sentiment", "input": [r["text"] for r in rows]})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["label"] for d in data] == [r["label"] for r in rows]
    assert all(abs(sum(d["probabilities"].values()) - 1) < 1e-3 for d in data)
    assert resp.json()["usage"]["prompt_tokens"] > 4


# ---- errors through the client: the right exception class (S14) ---------------------------------------
def test_client_exception_classes(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="peaky", messages=CHAT["messages"], temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="peaky", prompt="word " * 2100, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sentiment", messages=CHAT["messages"])  # a classifier


# ---- raw bad bodies: always a 4xx envelope, never 5xx or 422 (S1–S5) ----------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/embeddings"])
@pytest.mark.parametrize("body", [b"x{{", b"[]", b"42", b"null", b"", b'"text"', b"\xff\xfe\x00bad",
                                  b'{"model": 5}', b'{"model": "peaky", "messages": "hi", "prompt": 7}',
                                  b'{"model": "peaky", "max_tokens": 1e400}', b'{"model": "peaky", "n": NaN}',
                                  b'[' * 100000])
def test_bad_bodies_are_400(server, path, body):
    assert_envelope(post(server, path, body), 400)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 1e308), ("top_p", 1.5),
                                         ("top_p", 0), ("max_tokens", 0), ("max_tokens", 10 ** 30), ("n", 100),
                                         ("n", 10 ** 40), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]),
                                         ("presence_penalty", 3), ("messages", []), ("seed", 10 ** 30),
                                         ("messages", [{"role": "wizard", "content": "x"}]), ("top_logprobs", 21),
                                         ("logprobs", 3)])
def test_out_of_range_parameters_name_the_parameter(server, field, value):
    err = assert_envelope(post(server, "/v1/chat/completions", {**CHAT, field: value}), 400)
    assert err["param"] and err["param"].split(".")[0] == field


def test_context_length(server):
    assert_envelope(post(server, "/v1/completions", {"model": "peaky", "prompt": "word " * 2100}), 400,
                    param="prompt", code="context_length_exceeded")
    assert_envelope(post(server, "/v1/completions", {"model": "peaky", "prompt": "word " * 100, "max_tokens": 2000}),
                    400, param="max_tokens", code="context_length_exceeded")


def test_body_limits_and_batch_sizes(server):
    big = {"model": "sentiment", "input": ["x" * 1000] * 300}
    assert_envelope(post(server, "/v1/classify", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while read
        for _ in range(300):
            yield b"x" * 1000

    resp = httpx.post(server.url + "/v1/classify", content=chunks(), timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert_envelope(resp, 413)
    assert_envelope(post(server, "/v1/classify", {"model": "sentiment", "input": []}), 400, param="input")
    assert_envelope(post(server, "/v1/classify", {"model": "sentiment", "input": ["a"] * 65}), 400, param="input")
    assert_envelope(post(server, "/v1/embeddings", {"model": "minilm-l6", "input": []}), 400, param="input")


def test_unknown_model_and_route(server):
    assert_envelope(post(server, "/v1/classify", {"model": "nope", "input": "x"}), 404, code="model_not_found")
    assert_envelope(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_envelope(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405)


# ---- keys (S7) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "peaky"}),
                                       ("/v1/classify", {"model": "sentiment", "input": "x"}),
                                       ("/v1/embeddings", {"model": "minilm-l6", "input": "x"}), ("/v1/models", None),
                                       ("/tokenize", {"prompt": "x"}), ("/tokenizer_info", None)])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_every_inference_route_needs_a_key(server, path, body, headers):
    if body is None:
        resp = httpx.get(server.url + path, headers=headers)
    else:
        resp = post(server, path, body, headers=headers)
    assert_envelope(resp, 401, code="invalid_api_key")


def test_health_ready_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


# ---- concurrency (S12) -------------------------------------------------------------------------------
def test_identical_concurrent_greedy_requests_match_the_single_answer(client):
    kw = dict(model="peaky", messages=CHAT["messages"], max_tokens=32, temperature=0)
    single = client.chat.completions.create(**kw).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.chat.completions.create(**kw).choices[0].message.content, range(8)))
    assert answers == [single] * 8


def test_different_concurrent_requests_each_get_their_own_answer(client):
    prompts = [f"Tell me about topic {i}" for i in range(6)]

    def ask(p):
        return client.completions.create(model="peaky", prompt=p, max_tokens=16, temperature=0).choices[0].text

    singles = [ask(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, prompts)) == singles


# ---- metrics (S13) -------------------------------------------------------------------------------------
def test_metric_names_are_pinned(server, client):
    client.chat.completions.create(**{k: v for k, v in CHAT.items()})
    text = httpx.get(server.url + "/metrics").text
    for name in ['tunelab_requests_total{route="/v1/chat/completions",status="200"}',
                 'tunelab_rejections_total{reason="auth"}', 'tunelab_queue_depth{model="peaky"}',
                 'tunelab_running_batch_size{model="peaky"}', 'tunelab_time_to_first_token_seconds_bucket',
                 'tunelab_request_latency_seconds_bucket{le="0.01",route="/v1/chat/completions"}',
                 'tunelab_generated_tokens_total{model="peaky"}', 'tunelab_prompt_tokens_total{model="peaky"}']:
        assert name in text, name


# ---- a small server: admission, rate limits, disconnects, SIGTERM (S6, S9, S11) ------------------------
@pytest.fixture(scope="module")
def tight(request, engines, tmp_path_factory):
    log = tmp_path_factory.mktemp("tight") / "server.log"
    srv = ServerProcess([peaky_model(request, engines), "--embedding-model", "none", "--max-batch", "1",
                         "--max-waiting", "0", "--rate-limit", "60", "--drain-timeout", "60"], log,
                        env={"TUNELAB_API_KEYS": f"{KEY},{OTHER_KEY},{THIRD_KEY}"})
    yield srv
    srv.stop()


def _generated(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith('tunelab_generated_tokens_total{model="peaky"}'):
            return float(line.split()[-1])
    return 0.0


def _stream(server, key, max_tokens):
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_overload_is_503_and_a_disconnect_frees_the_slot(tight):
    with _stream(tight, KEY, 2000) as resp:  # holds the only slot
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        busy = post(tight, "/v1/chat/completions", CHAT, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert_envelope(busy, 503, code="overloaded")
        assert int(busy.headers["Retry-After"]) >= 1
    # the client went away mid-stream: its sequence is cancelled, the slot is free again
    deadline = time.time() + 30
    while 'tunelab_running_batch_size{model="peaky"} 0.0' not in httpx.get(tight.url + "/metrics").text:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert _generated(tight) < 1500  # the 2000-token request stopped early, not ran to the end
    ok = post(tight, "/v1/chat/completions", {**CHAT, "max_tokens": 2},
              headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert ok.status_code == 200, ok.text


def test_rate_limit_is_per_key_with_retry_after(tight):
    third = {"Authorization": f"Bearer {THIRD_KEY}"}
    body = {"model": "peaky", "prompt": "hi", "max_tokens": 1}
    codes = [post(tight, "/v1/completions", body, headers=third).status_code for _ in range(10)]
    assert codes.count(200) >= 9  # a burst of 10 s worth (60/min) passes
    for _ in range(5):
        limited = post(tight, "/v1/completions", body, headers=third)
        if limited.status_code == 429:
            break
    assert_envelope(limited, 429, code="rate_limit_exceeded")
    assert int(limited.headers["Retry-After"]) == 1
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=tight.url + "/v1", api_key=THIRD_KEY, max_retries=0).models.list()
    assert post(tight, "/v1/completions", body, headers=AUTH).status_code == 200  # other keys unaffected


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(request, engines, tmp_path):
    # a long drain timeout: the 1500-token stream takes ~30 s on a loaded CPU, and must not be cut off
    srv = ServerProcess([peaky_model(request, engines), "--embedding-model", "none", "--drain-timeout", "120"],
                        tmp_path / "server.log")
    result = {}

    def stream():
        chunks = []
        with _stream(srv, KEY, 1500) as resp:
            for line in resp.iter_lines():
                if not line:
                    continue
                chunks.append(line)
                if len(chunks) == 2:
                    result["started"] = True
        result["chunks"] = chunks

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while "started" not in result and time.time() < deadline:
        time.sleep(0.01)
    assert "started" in result, "the in-flight request did not start streaming"
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while True:  # the listening socket closes soon after SIGTERM
        try:
            httpx.get(srv.url + "/health", timeout=2)
        except httpx.TransportError:
            break
        assert time.time() < deadline, "the server still accepts connections 10 s after SIGTERM"
        time.sleep(0.02)
    t.join(150)
    code = srv.proc.wait(150)
    data = [json.loads(c[6:]) for c in result["chunks"] if c.startswith("data: {")]
    assert result["chunks"][-1] == "data: [DONE]"
    assert data[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for d in data if d["choices"][0]["delta"].get("content")) > 100  # it ran to the end
    assert code == 0


def test_refuses_public_bind_without_keys_and_short_keys(tmp_path):
    import subprocess
    import sys

    def run(*args, env=None):
        return subprocess.run([sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "tiny-llama",
                               *args], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "TUNELAB_API_KEYS": "", **(env or {})})

    res = run("--host", "0.0.0.0")
    assert res.returncode == 2 and "without API keys" in res.stderr
    res = run(env={"TUNELAB_API_KEYS": "short"})
    assert res.returncode == 2 and "shorter than 16" in res.stderr
    res = run("--api-keys-file", str(tmp_path / "missing.txt"))
    assert res.returncode == 2 and "cannot read the API keys file" in res.stderr


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["pytorch", "llama.cpp"])
def test_smollm2_served_answers_and_batches_exactly(request, tmp_path, engine):
    model = "builtin:smollm2-135m-instruct"
    if engine == "llama.cpp":  # its Q8_0 export
        model = str(request.getfixturevalue("smollm2_q8")[0])
    srv = ServerProcess([model, "--embedding-model", "none"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        ask = dict(model="smollm2-135m-instruct", max_tokens=24, temperature=0,
                   messages=[{"role": "user", "content": "What is the capital of France?"}])
        single = client.chat.completions.create(**ask)
        assert "Paris" in single.choices[0].message.content and single.choices[0].finish_reason == "stop"
        questions = ["What is the capital of France?", "Name a primary color.", "What is 2 plus 2?",
                     "What is the capital of France?"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda q: client.chat.completions.create(
                **{**ask, "messages": [{"role": "user", "content": q}]}).choices[0].message.content, questions))
        assert answers[0] == answers[3] == single.choices[0].message.content
    finally:
        assert srv.stop() == 0
