"""The playground page at / in headless Chromium (Debian's, driven by Playwright): paste a key, chat with
streamed tokens, classify a text and see its label."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import make_rows
from serve_process import KEY, ServerProcess

CHROMIUM = os.environ.get("TUNELAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("TUNELAB_REQUIRE_BROWSER"):
            pytest.fail(f"chromium not found at {CHROMIUM} (install Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def site(request, tmp_path_factory):
    _browser_or_skip()  # first: without chromium, skip (or fail in CI) before training models or starting a server
    peaky_llama = request.getfixturevalue("peaky_llama")
    tiny_classifier = request.getfixturevalue("tiny_classifier")
    tiny_ner = request.getfixturevalue("tiny_ner")
    from tunelab.rag.index import Index

    index = tmp_path_factory.mktemp("kb") / "index"
    Index.build([Path(__file__).resolve().parents[2] / "examples" / "support-kb"], index)
    srv = ServerProcess([f"peaky={peaky_llama}", str(tiny_classifier), f"ner={tiny_ner}", "--embedding-model", "none",
                         "--rag", f"support={index}@peaky"],
                        tmp_path_factory.mktemp("pg") / "server.log", env={"TUNELAB_API_KEYS": KEY})
    yield srv
    srv.stop()


def test_playground_chat_streams_and_classify_labels(site):
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(site.url + "/")
        assert page.title() == "tunelab playground"
        # without the key the API refuses, and the page says so
        sync_api.expect(page.locator("#conn")).to_contain_text("401")
        page.fill("#key", KEY)
        page.click("#refresh")
        sync_api.expect(page.locator("#conn")).to_have_text("4 model(s)")
        assert page.locator("#chat-model option").all_inner_texts() == ["peaky", "support"]

        # the page asks for a stream and reads server-sent events (how many reads the browser needs for them
        # depends on timing: a fast model's 24 tokens can arrive in one read, so that is not counted)
        chats = []
        page.on("request", lambda r: chats.append(r) if r.url.endswith("/v1/chat/completions") else None)
        page.fill("#max-tokens", "24")
        page.fill("#message", "What is the capital of France?")
        page.click("#send")
        sync_api.expect(page.locator("#chat-stats")).to_contain_text("completion tokens", timeout=60_000)
        answer = page.locator(".turn.assistant .answer").inner_text()
        assert answer.strip()
        assert len(chats) == 1 and chats[0].post_data_json["stream"] is True
        assert chats[0].response().headers["content-type"].startswith("text/event-stream")
        stats = page.locator("#chat-stats").inner_text()
        assert "first token" in stats and "24 completion tokens" in stats

        # held-out rows in the training format (the tiny classifier is only reliable on that shape)
        rows = make_rows(3, seed=99, start=1000)
        page.fill("#classify-text", "\n".join(r["text"] for r in rows))
        page.click("#classify")
        sync_api.expect(page.locator("#classify-result td.label")).to_have_count(3, timeout=30_000)
        assert page.locator("#classify-result td.label").all_inner_texts() == [r["label"] for r in rows]
        assert "tokens" in page.locator("#classify-stats").inner_text()

        # entities: the rows and the marked-up text show what the API returns for the same texts
        texts = ["Shares of Falcon Rock Energy (FRE) rose 4% after Tom Novak joined.", "nothing here <b>at all</b>"]
        expected = httpx.post(site.url + "/v1/entities", json={"model": "ner", "input": texts},
                              headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        page.fill("#entities-text", "\n".join(texts))
        page.click("#entities")
        sync_api.expect(page.locator("#entities-stats")).to_contain_text("tokens", timeout=30_000)
        rows = page.locator("#entities-result tr.entity").all()
        assert [r.locator("td").first.inner_text() for r in rows] == [e["type"] for d in expected
                                                                        for e in d["entities"]]
        assert page.locator("#entities-marked mark").count() == len(rows)
        shown = page.evaluate("""() => [...document.querySelectorAll('#entities-marked .marked')].map((d) => {
            const c = d.cloneNode(true);
            c.querySelectorAll('sub').forEach((s) => s.remove());
            return c.textContent; })""")
        assert shown == texts and page.locator("#entities-marked b").count() == 0  # text, never markup
        assert not errors
        browser.close()


CITATIONS = [{"index": 1, "document": "install.md", "heading": "Refunds <b>now</b>", "start": 270, "end": 380,
              "score": 0.78, "source": "install.md"},
             {"index": 3, "document": "faq.csv#1", "heading": "How do I reset my password?", "start": 0, "end": 90,
              "score": 0.51, "source": "faq.csv"}]


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_playground_shows_the_sources_of_an_answer_and_a_hand_off(site):
    sync_api = _browser_or_skip()
    meta = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "support"}
    grounded = _sse({**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                    {**meta, "choices": [{"index": 0, "delta": {"content": "Within 30 days [1]."}}]},
                    {**meta, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "citations": CITATIONS, "handoff": None})
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(site.url + "/")
        page.fill("#key", KEY)
        page.click("#refresh")
        sync_api.expect(page.locator("#conn")).to_have_text("4 model(s)")
        page.select_option("#chat-model", "support")
        # the server's own answer for a question the knowledge base does not cover: a hand-off, no sources
        page.fill("#message", "What will the weather be like in Lisbon tomorrow?")
        page.click("#send")
        sync_api.expect(page.locator(".turn.assistant .handoff")).to_contain_text("no relevant passage",
                                                                                  timeout=60_000)
        assert "support team" in page.locator(".turn.assistant .answer").inner_text()
        assert page.locator(".sources").count() == 0
        # a grounded answer (served here by the page's network layer: the tiny model cannot write one)
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=grounded))
        page.fill("#message", "How long do I have to ask for a refund?")
        page.click("#send")
        sync_api.expect(page.locator(".sources li")).to_have_count(2, timeout=30_000)
        items = page.locator(".sources li").all_inner_texts()
        assert items[0] == "install.md › Refunds <b>now</b> (characters 270–380, score 0.78)"  # text, not markup
        assert page.locator(".sources b").count() == 0
        assert page.evaluate("[...document.querySelectorAll('.sources li')].map((li) => li.value)") == [1, 3]
        assert not errors
        browser.close()
