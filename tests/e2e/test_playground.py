"""The playground page at / in headless Chromium (Debian's, driven by Playwright): paste a key, chat with
streamed tokens, classify a text and see its label."""

from __future__ import annotations

import os
import shutil

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
    srv = ServerProcess([f"peaky={peaky_llama}", str(tiny_classifier), f"ner={tiny_ner}", "--embedding-model", "none"],
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
        sync_api.expect(page.locator("#conn")).to_have_text("3 model(s)")
        assert page.locator("#chat-model option").all_inner_texts() == ["peaky"]

        # count DOM updates of the answer: streamed tokens arrive one after another
        page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.getElementById('transcript'),
                     {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#max-tokens", "24")
        page.fill("#message", "What is the capital of France?")
        page.click("#send")
        sync_api.expect(page.locator("#chat-stats")).to_contain_text("completion tokens", timeout=60_000)
        answer = page.locator(".turn.assistant .answer").inner_text()
        assert answer.strip()
        assert page.evaluate("window.updates") > 5
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
