"""Write `finance_ner.conll`: finance-news-style sentences with ORG / TICKER / PER / MONEY entities (BIO).

The sentences are composed from hand-written templates and entity lists (fictional companies and people)
with a fixed seed, so the file is reproducible: `python examples/data/make_finance_ner.py`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

COMPANIES = ["Northwind Traders", "Contoso", "Fabrikam", "Globex Corporation", "Initech", "Umbrella Holdings",
             "Stark Industries", "Wayne Enterprises", "Acme Corp", "Hooli", "Vandelay Industries", "Tyrell Systems",
             "Cyberdyne", "Soylent Foods", "Oscorp", "Pied Piper", "Wonka Confections", "Aperture Labs",
             "Blue Sun", "Massive Dynamic", "Gringotts Bank", "Monarch Airlines", "Duff Brewing", "Nakatomi Trading",
             "Prestige Worldwide", "Sirius Cybernetics", "Veridian Dynamics", "Dunder Mifflin", "Bluth Company",
             "Kruger Mining", "Halcyon Energy", "Zenith Pharma", "Orion Capital", "Atlas Logistics"]
TICKERS = ["NWT", "CTSO", "FBK", "GLBX", "INIT", "UMB", "STRK", "WAYN", "ACME", "HOOL", "VAND", "TYRL", "CYBD",
           "SOYL", "OSCP", "PIPR", "WONK", "APTR", "BSUN", "MDYN", "GRNG", "MNRC", "DUFF", "NKTM", "PWW", "SRCY",
           "VRDN", "DMI", "BLTH", "KRGM", "HLCY", "ZNTH", "ORCP", "ATLS"]
PEOPLE = ["Maria Lopez", "James Chen", "Aisha Bello", "Tom Becker", "Priya Nair", "Lars Eriksen", "Sofia Rossi",
          "Daniel Kim", "Fatima Haddad", "Oliver Grant", "Yuki Tanaka", "Elena Petrova", "Samuel Okafor",
          "Hannah Weiss", "Carlos Mendes", "Grace Liu", "Ahmed Karim", "Nora Lindqvist", "Victor Dubois",
          "Ruth Adeyemi", "Kenji Mori", "Laura Schmidt", "Mohan Rao", "Isabel Ortiz"]
ROLES = ["chief executive", "chief financial officer", "chairman", "analyst", "founder", "portfolio manager",
         "head of research", "strategist"]


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
        c1, c2 = rng.sample(range(len(COMPANIES)), 2)
        fill = {"ORG": (COMPANIES[c1], "ORG"), "ORG2": (COMPANIES[c2], "ORG"),
                "TICKER": (TICKERS[c1], "TICKER"), "TICKER2": (TICKERS[c2], "TICKER"),
                "PER": (rng.choice(PEOPLE), "PER"), "MONEY": (money(rng), "MONEY"),
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
