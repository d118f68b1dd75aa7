"""Text cleaning of one field (first version): Unicode NFC, whitespace runs collapsed, stripped."""

from __future__ import annotations

import re
import unicodedata

_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFC-normalise, turn every whitespace run (incl. newlines, tabs) into one space, strip."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def dedup_key(text: str) -> str:
    """The key under which two texts count as the same (case- and whitespace-insensitive)."""
    return _WS.sub(" ", text.casefold()).strip()
