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
    "call 0162424965446 in Kuala Lumpur",  # Luhn-valid by chance, but no card network starts with 0
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
