"""The retrieval index: chunks map back to their documents exactly, incremental add/remove equals a rebuild, an
index refuses another encoder, and hybrid search finds what either retriever alone finds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tunelab.errors import UserError
from tunelab.rag.chunking import chunk_document
from tunelab.rag.index import Encoder, Index, lexical_tokens
from tunelab.rag.sources import read_sources

INSTALL = """Intro before any heading. It has two sentences!

# Installing

Download the installer from the website. Run it and follow the steps.

## Windows

Double-click setup.exe. Accept the licence. The program installs into C:\\Program Files.

```
# not a heading: inside a code block
```

## Linux

Use the package manager: apt install example. Or build from source with make.

# Refunds

You can ask for a refund within 30 days of purchase. Write to support with your order number.
"""
SHIPPING = ("<html><head><title>Shipping</title><style>p {color: red}</style></head><body><h1>Shipping</h1>"
            "<p>We ship to 40 countries. Delivery takes 3 to 5 working days.</p><h2>运费</h2>"
            "<p>订单满100元免运费。否则运费为10元。偏远地区另加20元。</p><script>var x = 1;</script></body></html>")
RUN_ON = "x" * 2500 + " tail words here. " + "无空格的很长的中文句子" * 120


def write_kb(root, extra: bool = True):
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "install.md").write_text(INSTALL, encoding="utf-8")
    (root / "shipping.html").write_text(SHIPPING, encoding="utf-8")
    (root / "sub" / "faq.csv").write_text(
        "question,answer\nHow do I reset my password?,\"Open Settings, choose Account, then Reset password.\"\n"
        "Can I change my delivery address?,Yes: edit the address on the order page before the parcel ships.\n"
        ",an answer without a question\n", encoding="utf-8")
    if extra:
        (root / "sub" / "more.jsonl").write_text(
            json.dumps({"Question": "Do you sell gift cards?", "Answer": "Yes, from 10 to 500 euros."}) + "\n"
            + json.dumps({"question": "营业时间？", "answer": "周一到周五，上午九点到下午六点。"}, ensure_ascii=False)
            + "\nnot json\n", encoding="utf-8")
        (root / "long.txt").write_text(RUN_ON, encoding="utf-8")
    (root / ".hidden.md").write_text("# secret", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


@pytest.fixture(scope="module")
def tiny_encoder():
    return Encoder("tiny-bert")


def test_chunks_map_back_exactly_and_cover_every_document(tmp_path):
    docs, report = read_sources([write_kb(tmp_path / "kb")])
    assert [d.id for d in docs] == ["install.md", "long.txt", "shipping.html", "sub/faq.csv#1", "sub/faq.csv#2",
                                    "sub/more.jsonl#1", "sub/more.jsonl#2"]
    assert report.skipped["FAQ rows without a question and an answer"] == 1
    assert report.skipped["FAQ rows that are not JSON"] == 1
    shipping = next(d for d in docs if d.id == "shipping.html")
    assert "color" not in shipping.text and "var x" not in shipping.text and "订单满100元免运费" in shipping.text
    for max_chars in (120, 400, 1000):
        for doc in docs:
            chunks = chunk_document(doc, max_chars=max_chars, overlap=1)
            assert chunks
            covered = set()
            for c in chunks:
                assert doc.text[c.start:c.end] == c.text and 0 < len(c.text) <= max_chars
                covered.update(range(c.start, c.end))
            assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())  # nothing is lost
    install = next(d for d in docs if d.id == "install.md")
    paths = {c.text.split("\n")[0]: c.headings for c in chunk_document(install, max_chars=120)}
    assert paths["## Linux"] == ("Installing", "Linux") and paths["# Refunds"] == ("Refunds",)
    assert [c.headings for c in chunk_document(install, max_chars=120) if "Intro" in c.text] == [()]
    assert not any("inside a code block" in h for c in chunk_document(install) for h in c.headings)
    assert [c.headings for c in chunk_document(shipping, 120) if "免运费" in c.text] == [("Shipping", "运费")]


def test_overlap_repeats_the_last_sentence():
    from tunelab.rag.sources import Document

    text = " ".join(f"Sentence number {i} is here." for i in range(12))
    chunks = chunk_document(Document("d", "/d", "text", text), max_chars=90, overlap=1)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end and a.text.endswith(text[b.start:a.end])  # the next starts inside the previous


def test_incremental_add_and_remove_equal_a_rebuild(tmp_path, tiny_encoder):
    full = write_kb(tmp_path / "full")
    part = write_kb(tmp_path / "part", extra=False)
    rebuilt, _ = Index.build([full], tmp_path / "rebuilt", tiny_encoder, max_chars=200)
    grown, summary = Index.build([part], tmp_path / "grown", tiny_encoder, max_chars=200)[0].add([full])
    assert summary["encoded"] == len([c for c in rebuilt.chunks if c.doc_id in
                                      {"long.txt", "sub/more.jsonl#1", "sub/more.jsonl#2"}])  # only new text
    shrunk, _ = Index.build([full], tmp_path / "shrunk", tiny_encoder, max_chars=200)[0].remove(
        ["long.txt", "sub/more.jsonl#1", "sub/more.jsonl#2"])
    small, _ = Index.build([part], tmp_path / "small", tiny_encoder, max_chars=200)
    for a, b in ((grown, rebuilt), (shrunk, small)):
        assert [c.key for c in a.chunks] == [c.key for c in b.chunks]
        def texts(index):  # the sources differ (two folders); ids, texts and fingerprints may not
            return {i: {k: v for k, v in d.items() if k != "source"} for i, d in index.documents.items()}
        assert texts(a) == texts(b)
        np.testing.assert_allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-5)
        for q in ("refund within 30 days", "运费", "gift cards"):
            for mode in ("dense", "bm25", "hybrid"):
                assert [h.chunk.key for h in a.search(q, 5, mode)] == [h.chunk.key for h in b.search(q, 5, mode)]
    # a changed document is re-chunked and re-encoded; an unchanged one is not
    (tmp_path / "part" / "install.md").write_text(INSTALL.replace("30 days", "60 days"), encoding="utf-8")
    changed, summary = Index.load(tmp_path / "small", tiny_encoder).add([tmp_path / "part"])
    assert summary["encoded"] == len([c for c in changed.chunks if c.doc_id == "install.md"])
    assert "60 days" in changed.documents["install.md"]["text"]
    meta = json.loads((tmp_path / "small" / "tunelab.json").read_text())
    assert meta["kind"] == "index" and meta["documents"] == 4 and {s["documents"] for s in meta["sources"]} == {1, 2}
    with pytest.raises(UserError, match="has no document 'nope'"):
        changed.remove(["nope"])
    # a row deleted from a file that is added again leaves the index with it
    faq = tmp_path / "part" / "sub" / "faq.csv"
    faq.write_text("question,answer\nCan I change my delivery address?,Yes: on the order page.\n", encoding="utf-8")
    fewer, _ = changed.add([tmp_path / "part"])
    assert [i for i in fewer.documents if i.startswith("sub/faq.csv")] == ["sub/faq.csv#1"]
    assert fewer.documents["sub/faq.csv#1"]["text"].startswith("Can I change")


def test_an_index_refuses_another_encoder(tmp_path, tiny_encoder):
    Index.build([write_kb(tmp_path / "kb", extra=False)], tmp_path / "idx", tiny_encoder)
    other = Encoder("tiny-bert")
    other.fingerprint = "0" * 64  # another model's files
    with pytest.raises(UserError, match="was built with the encoder tiny-bert"):
        Index.load(tmp_path / "idx", other)
    with pytest.raises(UserError, match="not a tunelab index"):
        Index.load(tmp_path / "kb")
    with pytest.raises(UserError, match="already holds an index"):
        Index.build([tmp_path / "kb"], tmp_path / "idx", tiny_encoder)
    with pytest.raises(UserError, match="was not written by tunelab"):
        Index.build([tmp_path / "kb"], tmp_path / "kb", tiny_encoder)


def test_lexical_terms_split_chinese_into_characters_and_bigrams():
    assert lexical_tokens("The 运费 is 10元!") == ["运", "费", "运费", "10", "元"]
    assert lexical_tokens("Windows系统") == ["windows", "系", "统", "系统"]


def test_messy_sources_read_as_a_user_means_them(tmp_path):
    from tunelab.rag.sources import Document

    (tmp_path / "faq.csv").write_bytes("\ufeffQuestion,Answer\nHow?,\"line one\nline two\"\n".encode())
    (tmp_path / "c.md").write_text("## Using C#\nText [/x] here.\n", encoding="utf-8")
    docs, _ = read_sources([tmp_path])
    assert docs[1].text == "How?\nline one\nline two"  # the byte-order mark dropped, the line break kept
    assert docs[0].headings == [(0, 2, "Using C#")]
    text = "A" * 40 + ". " + "B" * 40 + ". " + "C" * 90 + "."
    chunks = chunk_document(Document("d", "/d", "text", text), max_chars=100, overlap=1)
    assert len(chunks) == 2  # no chunk that only repeats the one before
    with pytest.raises(UserError, match="max_chars"):
        chunk_document(docs[0], max_chars=0)


def test_hybrid_search_with_minilm_finds_what_each_retriever_finds(tmp_path):
    kb = write_kb(tmp_path / "kb")
    idx, _ = Index.build([kb], tmp_path / "idx", "builtin:minilm-l6", max_chars=300)
    top = {mode: [h.chunk.doc_id for h in idx.search(q, 3, mode)] for mode, q in
           [("dense", "I forgot my login credentials"), ("bm25", "免运费"), ("hybrid", "how much is delivery 运费")]}
    assert top["dense"][0] == "sub/faq.csv#1"  # no shared word: found by meaning
    assert top["bm25"][0] == "shipping.html"  # Chinese without spaces: found by characters
    assert top["hybrid"][0] == "shipping.html"
    hit = idx.search("reset my password", 1)[0]
    assert hit.chunk.doc_id == "sub/faq.csv#1" and hit.dense > 0.5 and hit.source.endswith("faq.csv")
    given = idx.search("reset my password", 3, vector=idx.encoder(["reset my password"])[0])
    assert [h.chunk.key for h in given] == [h.chunk.key for h in idx.search("reset my password", 3)]
    assert idx.search("   ", 3) == []
    with pytest.raises(UserError, match="search mode"):
        idx.search("x", 3, "sparse")


def test_index_commands(tmp_path):
    from tunelab.cli import app

    kb = write_kb(tmp_path / "kb", extra=False)
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", str(kb), "--out", str(tmp_path / "idx"), "--encoder", "tiny-bert"])
    assert built.exit_code == 0, built.output
    assert "4 documents" in built.output and "1 FAQ rows without a question and an answer" in built.output
    shown = runner.invoke(app, ["index", "show", str(tmp_path / "idx")])
    assert shown.exit_code == 0 and "sub/faq.csv#2" in shown.output and "tiny-bert" in shown.output
    found = runner.invoke(app, ["index", "search", str(tmp_path / "idx"), "refund", "-k", "2", "--mode", "bm25"])
    assert found.exit_code == 0 and "Refunds" in found.output
    (kb / "markup.md").write_text("# Brackets\nSee [/x] and [here](https://example.com) for the refund form.\n",
                                  encoding="utf-8")
    assert runner.invoke(app, ["index", "add", str(tmp_path / "idx"), str(kb)]).exit_code == 0
    shown = runner.invoke(app, ["index", "search", str(tmp_path / "idx"), "refund form", "--mode", "bm25"])
    assert shown.exit_code == 0 and "[/x]" in shown.output  # user text is printed as it is, never as markup
    gone = runner.invoke(app, ["index", "remove", str(tmp_path / "idx"), "sub/faq.csv#2"])
    assert gone.exit_code == 0 and "4 documents" in gone.output


def test_a_documentation_page_keeps_its_main_content_only():
    from tunelab.rag.sources import html_text

    page = ("<html><head><title>Site</title></head><body><nav role='navigation'><a>Home</a> menu</nav>"
            "<div class='sidebar' role='search'><form><input value=q></form>Search</div>"
            "<div class='body' role='main'><h1>FAQ<a class='headerlink' href='#faq'>¶</a></h1>"
            "<nav class='contents'><ul><li>Why?</li></ul></nav><h2>Why?<a class='headerlink'>¶</a></h2>"
            "<p>Because<br>it is.<p>Unclosed paragraph</div><div class='footer'>© 2024</div></body></html>")
    text, headings = html_text(page)
    assert text == "FAQ\nWhy?\nBecause\nit is.\nUnclosed paragraph\n"
    assert [(level, title) for _, level, title in headings] == [(1, "FAQ"), (2, "Why?")]
    assert all(text[o:o + len(t)] == t for o, _, t in headings)
    # a page that marks no main content keeps everything but scripts, styles and navigation
    assert html_text("<p>one</p><nav>menu</nav><aside>ad</aside><p>two</p>")[0] == "one\ntwo\n"
    # "main" that is not an element, or an empty main element, does not hide the page
    for page in ('<div data-role="main"><p>one</p></div>', '<p>write role="main" to mark it</p>',
                 "<!-- <main> --><p>one</p>", "<script>x = '<main>'</script><p>one</p>", "<main></main><p>one</p>",
                 '<form action="/"><p>one</p></form>'):
        assert html_text(page)[0].strip(), page
