from tunelab.config import CleanConfig
from tunelab.data.clean import Cleaner


def test_default_steps_repair_and_count():
    c = Cleaner(CleanConfig())
    assert c.text("I just donâ€™t trust it") == "I just don't trust it"
    assert c.text("zero\u200bwidth\x00 and\tcontrol\x07 \n chars ") == "zerowidth and control chars"
    assert c.text("ｆｕｌｌ width") == "full width"  # ftfy folds full-width letters
    assert c.counts["fix_text"] == 3 and c.counts["whitespace"] == 1
    raw = Cleaner(CleanConfig(fix_text=False))
    assert raw.text("zero\u200bwidth\x00 bidi\u202e") == "zerowidth bidi"
    assert raw.counts["invisible_removed"] == 1


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
