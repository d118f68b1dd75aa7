from tunelab.config import CleanConfig
from tunelab.data.clean import Cleaner


def test_default_steps_repair_and_count():
    c = Cleaner(CleanConfig())
    assert c.text("I just donâ€™t trust it") == "I just don’t trust it"  # repaired, the quote kept as written
    assert c.text("zero\u200bwidth\x00 and\tcontrol\x07 \n chars ") == "zerowidth and control chars"
    assert c.text("ｆｕｌｌ width") == "ｆｕｌｌ width"  # width is not folded by default
    assert c.counts["fix_text"] == 2 and c.counts["whitespace"] == 1 and "width_folded" not in c.counts
    raw = Cleaner(CleanConfig(fix_text=False))
    assert raw.text("zero\u200bwidth\x00 bidi\u202e") == "zerowidth bidi"
    assert raw.counts["invisible_removed"] == 1


def test_full_width_punctuation_is_no_mojibake():
    c = Cleaner(CleanConfig())
    for text in ["质量很好，物流也快！", "他说“很好”，‘不错’。", "２０２３年（限定）：ＯＫ",
                 "日本語のテキスト、「引用」。"]:
        assert c.text(text) == text
    assert not c.counts, c.counts
    assert c.text("cafÃ© au lait") == "café au lait" and c.text("å¥½è¯„") == "好评"
    assert c.counts == {"fix_text": 2}


def test_fold_width_is_its_own_counted_step():
    c = Cleaner(CleanConfig(fold_width=True))
    assert c.text("ＡＢＣ１２３！") == "ABC123!"
    assert c.text("质量很好，物流也快！") == "质量很好,物流也快!"
    assert c.text("plain ascii") == "plain ascii" and c.text("好评") == "好评"
    assert c.counts == {"width_folded": 2}
    c = Cleaner(CleanConfig(fold_width=True))
    assert c.text("cafÃ©：ＯＫ") == "café:OK"  # both steps change the row: each counts it
    assert c.counts == {"fix_text": 1, "width_folded": 1}
    c = Cleaner(CleanConfig(fold_width=True, fix_text=False))
    assert c.text("cafÃ©：ＯＫ") == "cafÃ©:OK" and c.counts == {"width_folded": 1}


def test_nfkc_and_switching_steps_off():
    c = Cleaner(CleanConfig(fix_text=False))
    assert c.text("ｆｕｌｌ width") == "ｆｕｌｌ width"  # NFC keeps compatibility forms
    c = Cleaner(CleanConfig(unicode_form="NFKC", fix_text=False, collapse_whitespace=False))
    assert c.text("ｆｕｌｌ  width") == "full  width"
    assert "fix_text" not in c.counts


def test_social_normalisation():
    c = Cleaner(CleanConfig(urls="replace", mentions="replace", hashtags="strip_hash"))
    out = c.text("@united my bag is lost https://t.co/abc #fail email a@b.com")
    assert out == "@user my bag is lost <url> fail email a@b.com"
    c = Cleaner(CleanConfig(urls="remove", mentions="remove", hashtags="remove"))
    assert c.text("@united lost http://x.y/z #fail") == "lost"


def test_lengths_and_labels():
    c = Cleaner(CleanConfig(min_chars=3, max_chars=10, max_words=2, lowercase_labels=True,
                            label_map={"pos": "positive"}))
    assert c.length_reason("") == "empty_text"
    assert c.length_reason("ab") == "too_short"
    assert c.length_reason("abcdefghijk") == "too_long"
    assert c.length_reason("a b c") == "too_long"
    assert c.length_reason("a b") is None
    assert c.label("  POS ") == "positive" and c.counts["label_normalized"] == 1


def test_documents_keep_their_lines():
    c = Cleaner(CleanConfig(), keep_newlines=True)
    assert c.text("  para one\r\nline  two \n\n\n\n\tpara two  ") == "para one\nline two\n\npara two"


def test_prepare_keeps_chinese_reviews_as_written(tmp_path):
    """Full-width punctuation and timestamps in Chinese reviews: no step changes them, none counts them; width
    folding, when asked for, is reported under its own name."""
    import json

    from tunelab.config import PrepareOptions
    from tunelab.data.dataset import load_split
    from tunelab.data.prepare import prepare

    texts = [f"第{i}条：质量很好，物流也快！下单时间 2007-10-30 21:58:{i:02d}，版本 v2.13.0" for i in range(6)]
    src = tmp_path / "reviews.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "label": "pos"}, ensure_ascii=False) for t in texts),
                   encoding="utf-8")
    opts = dict(val_ratio=0, test_ratio=0, dedup={"near": False})
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(**opts))
    assert sorted(r["text"] for r in load_split(tmp_path / "ds", "train")) == texts
    assert not meta["report"]["steps"] and not meta["report"]["pii"], meta["report"]
    meta = prepare(str(src), tmp_path / "folded", PrepareOptions(**opts, clean={"fold_width": True}))
    assert meta["report"]["steps"] == {"clean.width_folded": 6}
    assert "质量很好,物流也快!" in load_split(tmp_path / "folded", "train")[0]["text"]
