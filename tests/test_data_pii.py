import pytest

from tunelab.data.pii import PiiRedactor, luhn_ok


@pytest.mark.parametrize("text,expected,kind", [
    ("mail me at jane.doe+work@example.co.uk today", "mail me at <EMAIL> today", "email"),
    ("card 4111 1111 1111 1111 thanks", "card <CREDIT_CARD> thanks", "credit_card"),
    ("card 4111-1111-1111-1111.", "card <CREDIT_CARD>.", "credit_card"),
    ("server 192.168.1.20 is down", "server <IP> is down", "ip"),
    ("v6 2001:db8:85a3::8a2e:370:7334 ok", "v6 <IP> ok", "ip"),
    ("call +1 (415) 555-0132 now", "call <PHONE> now", "phone"),
    ("call 020 7946 0958", "call <PHONE>", "phone"),
    ("key sk-abcdefghijklmnopqrstuvwx123 leaked", "key <SECRET> leaked", "secret"),
    ("AKIAABCDEFGHIJKLMNOP is aws", "<SECRET> is aws", "secret"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token <SECRET>", "secret"),
    ("hash 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 ok", "hash <SECRET> ok", "secret"),
])
def test_redacts_each_type(text, expected, kind):
    r = PiiRedactor()
    assert r.redact(text) == expected
    assert r.counts[kind] == 1 and sum(r.counts.values()) == 1


@pytest.mark.parametrize("text", [
    "flight 1234 was late by 45 minutes",
    "card 4111 1111 1111 1112 fails luhn",
    "version 1.2.3 released",
    "price $1,299.99 on 2024-05-01",
    "@united #fail at gate B12",
    "999.999.999.999 is not an ip",
    "ref 0162424965446 in Kuala Lumpur",  # Luhn-valid by chance, but no card network starts with 0
    "#PlayersB4LawfulProcessForOffFieldActsLoseSeasons #patriotshavebeencheaterssinceday1",
    "no-enertainment-on-6-hour-flights-this-is-long",
])
def test_leaves_ordinary_text_alone(text):
    r = PiiRedactor()
    out = r.redact(text)
    assert out == text and not r.counts, (out, r.counts)


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


def test_only_selected_types_and_unknown_type():
    r = PiiRedactor(["email"])
    assert r.redact("a@b.com 192.168.0.1") == "<EMAIL> 192.168.0.1"
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiRedactor(["ssn"])


@pytest.mark.parametrize("text,expected", [
    ("call me at 5551234567", "call me at <PHONE>"),
    ("Text me on 555 1234567 tonight", "Text me on <PHONE> tonight"),
    ("my mobile number is: (415)5550132.", "my mobile number is: <PHONE>."),
    ("手机号13812345678", "手机号<PHONE>"),
    ("联系电话：021-12345678", "联系电话：<PHONE>"),
    ("电话020 7946 0958", "电话<PHONE>"),  # a formatted phone straight after Chinese text
    ("+14155550123", "<PHONE>"),
    ("reach me on +86 13812345678!", "reach me on <PHONE>!"),
])
def test_phone_after_a_phone_word_or_with_a_plus(text, expected):
    r = PiiRedactor()
    assert r.redact(text) == expected
    assert r.counts == {"phone": 1}


@pytest.mark.parametrize("text", [
    "order 5551234567 shipped",
    "order number 5551234567 shipped, call us",  # "order number" names an ID, not a phone
    "call me about order 5551234567",  # an ID noun after the phone word
    "returned my call. Case number 8273993",
    "created 1704067200123 ms after the epoch",  # a 13-digit millisecond timestamp
    "due 2024-01-05",
    "call me on 2024-01-05",  # a phone word, but a date
    "13812345678",  # known gap: a bare mobile with no phone word is kept
    "5551234567 is my cell",  # known gap: the phone word must come before the number
    "2+2 = 4 and 3+12345678 is arithmetic",
])
def test_bare_digits_without_phone_context_stay(text):
    r = PiiRedactor()
    assert r.redact(text) == text and not r.counts


def test_email_and_secret_straight_after_chinese_text():
    r = PiiRedactor()
    assert r.redact("邮箱jane@example.com谢谢") == "邮箱<EMAIL>谢谢"
    assert r.redact("密钥sk-abcdefghijklmnopqrstuvwx123") == "密钥<SECRET>"


def test_find_gives_spans_without_counting():
    r = PiiRedactor()
    text = "mail a.b@example.com, call 555-123-4567 or 10.0.0.7"
    spans = r.find(text)
    assert [(text[s:e], kind) for s, e, kind in spans] == [
        ("a.b@example.com", "email"), ("555-123-4567", "phone"), ("10.0.0.7", "ip")]
    assert not r.counts
    assert r.redact(text) == "mail <EMAIL>, call <PHONE> or <IP>"
    assert r.counts == {"email": 1, "phone": 1, "ip": 1}
    assert PiiRedactor(["ip"]).find(text) == [spans[2]]


def test_each_occurrence_counted_once_by_type():
    r = PiiRedactor()
    r.redact("call 5551234567 or +14155550123; mail x@y.org")
    r.redact("x@y.org")
    assert r.counts == {"phone": 2, "email": 2}


def test_redact_prefix_never_cuts_pii_in_two():
    r = PiiRedactor()
    text = "a" * 490 + " jane.doe@example.com " + "b" * 10_000_000
    out = r.redact_prefix(text, 500)
    assert out == "a" * 490 + " <EMAIL>" and r.counts == {"email": 1}
    assert r.redact_prefix("x" * 600, 500) == "x" * 500
    assert r.redact_prefix("call me at 5551234567", 500) == "call me at <PHONE>"


def test_redact_tokens_joins_split_pii_into_one_placeholder():
    r = PiiRedactor()
    # "john@x.com" tokenised as word/punctuation, no whitespace in between; PER next to it stays aligned
    tokens = ["Jane", "Doe", "(", "john", "@", "x", ".", "com", ")", "said"]
    tags = ["B-PER", "I-PER", "O", "B-MAIL", "I-MAIL", "I-MAIL", "I-MAIL", "I-MAIL", "O", "O"]
    spaced = [False, True, True, False, False, False, False, False, False, True]
    assert r.redact_tokens(tokens, tags, spaced) == (
        ["Jane", "Doe", "(", "<EMAIL>", ")", "said"], ["B-PER", "I-PER", "O", "B-MAIL", "O", "O"])
    # CoNLL tokens (joined by spaces): a phone over three tokens, and one after a phone word
    tokens = ["call", "555", "123", "4567", "or", "dial", "5551234567", "now"]
    tags = ["O", "B-TEL", "I-TEL", "I-TEL", "O", "O", "O", "O"]
    assert r.redact_tokens(tokens, tags, [True] * 8) == (
        ["call", "<PHONE>", "or", "dial", "<PHONE>", "now"], ["O", "B-TEL", "O", "O", "O", "O"])
    assert r.counts == {"email": 1, "phone": 2}


def test_redact_tokens_keeps_the_uncovered_parts_of_a_token():
    r = PiiRedactor()
    tokens, tags = ["Contact:jane@x.com,", "thanks"], ["B-X", "O"]
    assert r.redact_tokens(tokens, tags, [True, True]) == (["Contact:", "<EMAIL>", ",", "thanks"],
                                                           ["B-X", "I-X", "I-X", "O"])
    # a span that starts inside one token and ends inside the next
    tokens, tags = ["tel:+1", "4155550123;ok"], ["O", "B-Y"]
    assert r.redact_tokens(tokens, tags, [False, True]) == (["tel:", "<PHONE>", ";ok"], ["O", "O", "B-Y"])
    assert r.redact_tokens(["no", "pii"], ["O", "O"], [True, True]) == (["no", "pii"], ["O", "O"])


def test_ner_text_with_entities_is_redacted_before_tokenising(tmp_path):
    import json

    from tunelab.config import PrepareOptions
    from tunelab.data.dataset import load_split
    from tunelab.data.prepare import prepare

    text = "Jane Doe wrote from jane.doe@acme.com, call 555 123 4567."
    rows = [{"text": text, "entities": [{"start": 0, "end": 8, "label": "PER"},
                                        {"start": 20, "end": 37, "label": "MAIL"}]}]
    src = tmp_path / "spans.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    meta = prepare(str(src), tmp_path / "ds", PrepareOptions(task="ner", val_ratio=0, test_ratio=0))
    row = load_split(tmp_path / "ds", "train")[0]
    assert row["tokens"] == ["Jane", "Doe", "wrote", "from", "<EMAIL>", ",", "call", "<PHONE>", "."]
    assert row["tags"] == ["B-PER", "I-PER", "O", "O", "B-MAIL", "O", "O", "O", "O"]
    assert meta["report"]["pii"] == {"email": 1, "phone": 1}


@pytest.mark.parametrize("text", [
    # dates, times, timestamps (the Chinese product reviews: "2007-10-30 21:58:23" read as an IPv6 address)
    "2007-10-30 21:58:23", "评论时间：2007-10-30 21:58:23 好评", "2007-10-30T21:58:23Z",
    "2007-10-30T21:58:23.123+08:00",
    "2007/10/30", "30.10.2007", "2007.10.30", "10/30/2007 9:05 PM", "2007年10月30日 21:58:23", "21:58:23", "12:30",
    "at 10:30:45.123 sharp", "a 3:2 ratio", "score 1:0:2", "12:30:45:67",
    "call me on 2007-10-30 21:58:23", "phone 21:58:23", "tel 2007.10.30", "mobile 30.10.2007", "电话 2007年10月30日",
    "手机 2023-10-30 12:30:45", "下单时间：2023/10/30 12:30 联系客服",
    # versions
    "v2.13.0", "version 1.2.3.4", "v10.0.0.1", "release 1.2.3.4.5 out", "1.2.3.4.5", "版本号：2.1.0.3",
    "Chrome 120.0.6099.109", "バージョン 1.2.3.4", "версия 10.0.0.1",
    # order numbers, Luhn-valid and starting like a card too
    "订单号 2023103012345678", "订单号：2023103012345675", "order #A12345678", "Order No. 1234567890",
    "order number 4111111111111111", "Order No. 4111 1111 1111 1111", "tracking number: 5123456789012346",
    "Order No. 555-123-4567", "注文番号：2023103012345675", "注文番号 4111111111111111 の商品",
    "номер заказа 2023103012345675", "заказ № 4111111111111111", "رقم الطلب 2023103012345675 شكرا",
    "تاريخ الطلب 2007-10-30 21:58:23", "تاريخ الطلب ٢٠٠٧-١٠-٣٠ ٢١:٥٨:٢٣ اتصل بي",
    # prices, amounts
    "price ¥1,299.00 total 12345678.90", "总价 ￥12,345,678.00 元", "12 345 678 €", "1.299,00 € incl. VAT",
    "$1,234,567.89", "USD 1234567", "3999元", "итого 12 345 678 руб.",
    # colons that are no IPv6
    "mac 00:1a:2b:3c:4d:5e", "a:b:c", "dead:beef:cafe", "x[::2] and a[1::2]", "A::B and std::vector",
])
def test_dates_times_versions_orders_amounts_are_no_pii(text):
    r = PiiRedactor()
    out = r.redact(text)
    assert out == text and not r.counts, (out, r.counts)


@pytest.mark.parametrize("text,expected", [
    ("v6 2001:db8::1 down", "v6 <IP> down"),
    ("link-local fe80::1ff:fe23:4567:890a.", "link-local <IP>."),
    ("loopback ::1 only", "loopback <IP> only"),
    ("[2001:db8::1]:8080", "[<IP>]:8080"),
    ("mapped ::ffff:192.168.1.1", "mapped <IP>"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full <IP>"),
    ("server is 10.0.0.1.", "server is <IP>."),
    ("hosts ...10.0.0.1, 192.168.1.20:8080", "hosts ...<IP>, <IP>:8080"),
    ("时间2007-10-30 21:58:23 服务器10.0.0.1", "时间2007-10-30 21:58:23 服务器<IP>"),
    ("2007-10-30 21:58:23 call me at 5551234567", "2007-10-30 21:58:23 call me at <PHONE>"),
    ("电话：13812345678，时间2007-10-30 21:58:23", "电话：<PHONE>，时间2007-10-30 21:58:23"),
    ("call 020 7946 0958 on 2024-01-05 at 10:30", "call <PHONE> on 2024-01-05 at 10:30"),
    ("+86 138-1234-5678 于 2023-01-01 10:00", "<PHONE> 于 2023-01-01 10:00"),
    ("For my order I paid with 4111 1111 1111 1111", "For my order I paid with <CREDIT_CARD>"),
    ("card number 4111111111111111", "card number <CREDIT_CARD>"),
    ("price $12, call 555 123 4567", "price $12, call <PHONE>"),
])
def test_real_ips_phones_and_cards_next_to_dates_are_still_redacted(text, expected):
    r = PiiRedactor()
    assert r.redact(text) == expected
