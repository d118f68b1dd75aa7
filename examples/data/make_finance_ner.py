"""Write `finance_ner.conll`: finance-news-style sentences with ORG / TICKER / PER / MONEY entities (BIO).

The sentences are composed from hand-written templates and name parts (fictional companies and people)
with a fixed seed, so the file is reproducible: `python examples/data/make_finance_ner.py`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

# Names are composed from parts, so most entities in the test split were never seen in train: the
# model has to use context (and word shape), not memory. Some parts are ordinary words ("Summit", "Bridge",
# "Apple"-like nouns), which a word-lookup approach gets wrong out of context.
PREFIXES = ["North", "Blue", "Silver", "Granite", "Summit", "Bright", "Pacific", "Iron", "Cedar", "Harbor", "Falcon",
            "Atlas", "Nova", "Crescent", "Evergreen", "Red", "Golden", "Lake", "Stone", "Pioneer", "Union", "Royal",
            "Apex", "Vertex", "Quantum", "Meridian", "Horizon", "Orchid", "Bridge", "Sterling"]
CORES = ["wind", "field", "gate", "point", "rock", "water", "light", "stream", "wood", "peak", "line", "star",
         "bay", "ridge", "port", "crest", "vale", "spring", "hill", "works"]
SUFFIXES = ["Corp", "Holdings", "Group", "Inc", "Systems", "Capital", "Energy", "Labs", "Bank", "Motors",
            "Pharma", "Foods"]
FIRST = ["Maria", "James", "Aisha", "Tom", "Priya", "Lars", "Sofia", "Daniel", "Fatima", "Oliver", "Yuki", "Elena",
         "Samuel", "Hannah", "Carlos", "Grace", "Ahmed", "Nora", "Victor", "Ruth", "Kenji", "Laura", "Mohan", "Isabel",
         "Chen", "Amara", "Felix", "Ingrid", "Rafael", "Leila", "Marcus", "Zara", "Hugo", "Mei", "Tariq", "Olga"]
LAST = ["Lopez", "Chen", "Bello", "Becker", "Nair", "Eriksen", "Rossi", "Kim", "Haddad", "Grant", "Tanaka",
        "Petrova", "Okafor", "Weiss", "Mendes", "Liu", "Karim", "Lindqvist", "Dubois", "Adeyemi", "Mori", "Schmidt",
        "Rao", "Ortiz", "Walsh", "Novak", "Silva", "Hughes", "Berg", "Castillo", "Young", "Stone", "Price", "Fox"]
ROLES = ["chief executive", "chief financial officer", "chairman", "analyst", "founder", "portfolio manager",
         "head of research", "strategist"]


def company(rng: random.Random) -> tuple[str, str]:
    """(name, ticker): e.g. ("Granite Ridge Capital", "GRC")."""
    prefix, core, suffix = rng.choice(PREFIXES), rng.choice(CORES), rng.choice(SUFFIXES)
    if rng.random() < 0.5:
        name = f"{prefix}{core} {suffix}"
        ticker = (prefix[:2] + core[:1] + suffix[:1]).upper()
    else:
        name = f"{prefix} {core.capitalize()} {suffix}"
        ticker = (prefix[:1] + core[:1] + suffix[:1]).upper()
    return name, ticker


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def money(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"${rng.randrange(1, 999)} million"
    if kind == 1:
        return f"${rng.randrange(1, 99)}.{rng.randrange(1, 9)} billion"
    if kind == 2:
        return f"{rng.randrange(2, 900)} million euros"
    if kind == 3:
        return f"${rng.randrange(5, 400)}.{rng.randrange(10, 99)} a share"
    return f"£{rng.randrange(10, 500)} million"


TEMPLATES = [
    "{ORG} ( {TICKER} ) reported quarterly revenue of {MONEY} , beating analyst estimates .",
    "Shares of {ORG} fell 4 % after {PER} , its {ROLE} , said margins would shrink .",
    "{PER} , {ROLE} at {ORG} , expects the deal to close next quarter .",
    "{ORG} agreed to buy {ORG2} for {MONEY} in cash .",
    "The board of {ORG} named {PER} as its new {ROLE} on Monday .",
    "{TICKER} rose 7 % in early trading after {ORG} raised its full-year outlook .",
    "Analysts at {ORG2} cut their target for {ORG} to {MONEY} .",
    "{ORG} will return {MONEY} to shareholders through buybacks , {PER} told investors .",
    "Investors sold {TICKER} after the company missed estimates by {MONEY} .",
    "{PER} bought {MONEY} worth of {ORG} stock last week , a filing showed .",
    "{ORG} said net income rose to {MONEY} from a year earlier .",
    "According to {PER} , {ORG} has no plans to sell its logistics unit .",
    "{ORG} and {ORG2} announced a joint venture valued at {MONEY} .",
    "Trading in {TICKER} was halted pending news about {ORG} .",
    "{ORG} shares closed at {MONEY} , valuing the group at {MONEY2} .",
    "Regulators fined {ORG} {MONEY} over reporting failures .",
    "{PER} stepped down as {ROLE} of {ORG} after nine years .",
    "The market reacted calmly as {ORG} ( {TICKER} ) confirmed the layoffs .",
    "{ORG2} upgraded {TICKER} to buy , citing strong demand .",
    "{PER} of {ORG2} said {ORG} looks cheap at {MONEY} .",
    "Short sellers have bet against {ORG} , said {PER} .",
    "{ORG} priced its bond offering at {MONEY} .",
    "Revenue at {ORG} 's cloud division reached {MONEY} , {PER} said on a call .",
    "Stocks were mixed on Tuesday ; {TICKER} gained while {TICKER2} slipped .",
    "{ORG} expects capital spending of about {MONEY} next year .",
    "In a letter to staff , {PER} said {ORG} would keep hiring .",
    "{ORG} lost {MONEY} in the third quarter as costs climbed .",
    "Hedge fund manager {PER} disclosed a stake in {ORG} .",
    "The {MONEY} settlement ends a long dispute between {ORG} and {ORG2} .",
    "{TICKER} hit a record high after {PER} praised the results .",
    "Oil prices rose and {ORG} gained 3 % .",
    "{ORG} did not comment on the report .",
    "Markets were closed for the holiday .",
    "Bond yields edged higher on Wednesday as investors awaited inflation data .",
]


def tokens_and_tags(template: str, fill: dict[str, tuple[str, str]]) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for piece in template.split():
        m = re.fullmatch(r"\{(\w+)\}", piece)
        if not m:
            tokens.append(piece)
            tags.append("O")
            continue
        text, etype = fill[m.group(1)]
        words = text.split()
        tokens += words
        tags += [f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1)
    return tokens, tags


def main(n: int = 480, seed: int = 7) -> None:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        (org, ticker), (org2, ticker2) = company(rng), company(rng)
        fill = {"ORG": (org, "ORG"), "ORG2": (org2, "ORG"), "TICKER": (ticker, "TICKER"),
                "TICKER2": (ticker2, "TICKER"), "PER": (person(rng), "PER"), "MONEY": (money(rng), "MONEY"),
                "MONEY2": (money(rng), "MONEY"), "ROLE": (rng.choice(ROLES), None)}
        # roles are plain words, not entities
        template = template.replace("{ROLE}", fill["ROLE"][0])
        out.append(tokens_and_tags(template, fill))
    path = Path(__file__).with_name("finance_ner.conll")
    with open(path, "w", encoding="utf-8") as f:
        for tokens, tags in out:
            f.write("".join(f"{t} {g}\n" for t, g in zip(tokens, tags)) + "\n")
    print(f"wrote {len(out)} sentences to {path}")


if __name__ == "__main__":
    main()
