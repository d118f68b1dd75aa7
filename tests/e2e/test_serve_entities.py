"""`tunelab serve` with an NER model dir as a black box: POST /v1/entities (one text, a list), character
offsets into each text, the wrong route for a model kind, and keys — the model dirs in PyTorch, and their ONNX
exports in ONNX Runtime."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_process import KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
TEXTS = ["Shares of Silverspring Energy fell 4% after Tom Novak, its chief executive, resigned.",
         "腾讯控股今天在香港上涨3%", "Falcon Rock Energy (FRE) reported quarterly revenue of $5.2 billion."]


@pytest.fixture(scope="module", params=["pytorch", "onnxruntime"])
def server(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ner") / "server.log"
    names = ("tiny_ner", "tiny_classifier") if request.param == "pytorch" else ("ner_onnx", "classifier_onnx")
    ner, classifier = (request.getfixturevalue(n) for n in names)
    srv = ServerProcess([f"ner={ner}", f"sentiment={classifier}", "--embedding-model", "none"], log,
                        env={"TUNELAB_API_KEYS": KEY})
    srv.engine = request.param
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in log.read_text()


def post(server, path, body, headers=AUTH):
    return httpx.post(server.url + path, content=json.dumps(body), headers=headers, timeout=60)


def check(text, entities):
    for e in entities:
        assert set(e) == {"type", "text", "start", "end", "score"}
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1


def test_models_list_the_ner_model_as_entities(server):
    listing = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]
    assert {m["id"]: m["tunelab_kind"] for m in listing} == {"ner": "entities", "sentiment": "classify"}
    assert {m["tunelab_engine"] for m in listing} == {server.engine}


def test_entities_for_one_text_and_a_list(server):
    one = post(server, "/v1/entities", {"model": "ner", "input": TEXTS[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == "ner" and body["usage"]["prompt_tokens"] > 10
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    (item,) = body["data"]
    assert item["object"] == "entities" and item["index"] == 0
    check(TEXTS[0], item["entities"])
    assert ("ORG", "Silverspring Energy") in {(e["type"], e["text"]) for e in item["entities"]}

    many = post(server, "/v1/entities", {"model": "ner", "input": TEXTS})
    assert many.status_code == 200, many.text
    data = many.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for text, d in zip(TEXTS, data):
        check(text, d["entities"])
    assert data[0]["entities"] == item["entities"]  # the same answer alone or in a batch


def test_wrong_model_kind_names_the_right_route(server):
    for path, model, route in (("/v1/entities", "sentiment", "/v1/classify"),
                               ("/v1/classify", "ner", "/v1/entities")):
        resp = post(server, path, {"model": model, "input": "Acme rose."})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "wrong_model_kind" and err["param"] == "model" and route in err["message"]


def test_entities_needs_a_key(server):
    resp = post(server, "/v1/entities", {"model": "ner", "input": "Acme rose."},
                headers={"Content-Type": "application/json"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
