"""Stop strings in streamed text: the incremental matcher cuts exactly where a search of the whole text
would, whatever the pieces, never shows any part of a stop string, and holds back only what could still
start one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.generate import StopTrimmer


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the first stop string to complete (of those ending at the same place, the longest)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], True
    return text, False


@settings(max_examples=400, deadline=None, derandomize=True)
@given(text=st.text(alphabet="ab#<>", max_size=60),
       stops=st.lists(st.text(alphabet="ab#<>", min_size=1, max_size=6), max_size=4),
       cuts=st.lists(st.integers(0, 60), max_size=12))
def test_streamed_cut_equals_a_whole_text_search(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    t = StopTrimmer(stops)
    shown, longest = "", max((len(s) for s in stops), default=0)
    for p in pieces:
        shown += t.push(p)
        assert len(t.text) == len(shown) and len(t._held) <= max(0, longest - 1)
    if not t.done:
        shown += t.flush()
    expected, stopped = reference(text, stops)
    assert (shown, t.done) == (expected, stopped)
    assert t.text == shown


def test_long_stop_strings_cost_per_character_not_per_length():
    stop = "x" * 999 + "y"
    t = StopTrimmer([stop] * 4)
    out = "".join(t.push("x" * 7) for _ in range(2000))  # a partial match that never completes
    assert out == "x" * (14000 - 999) and len(t._held) == 999
    assert t.push("y") == "" and t.done and t.text == "x" * (14000 - 999)
