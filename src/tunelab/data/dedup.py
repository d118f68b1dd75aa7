"""Exact de-duplication on the normalised text, before any split.

Within a group of identical texts the first row is kept when all labels agree; when they
disagree the whole group is dropped (the right label is unknown), and the group is reported.
"""

from __future__ import annotations

from collections import defaultdict

from tunelab.data.clean import dedup_key


def exact_dedup(rows: list[dict], text_field: str = "text", label_field: str = "label"
                ) -> tuple[list[dict], dict[str, list[dict]], list[dict]]:
    """rows -> (kept, dropped by reason, conflicting groups summary). Order of kept rows is preserved."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[dedup_key(r[text_field])].append(i)
    kept, dropped = [], {"duplicate": [], "conflicting_label_duplicate": []}
    conflicts = []
    drop_reason: dict[int, str] = {}
    for members in groups.values():
        if len(members) == 1:
            continue
        labels = {rows[i][label_field] for i in members}
        if len(labels) > 1:
            for i in members:
                drop_reason[i] = "conflicting_label_duplicate"
            conflicts.append({"text": rows[members[0]][text_field], "labels": sorted(labels),
                              "lines": [rows[i]["_line"] for i in members]})
        else:
            for i in members[1:]:
                drop_reason[i] = "duplicate"
    for i, r in enumerate(rows):
        reason = drop_reason.get(i)
        if reason is None:
            kept.append(r)
        else:
            dropped[reason].append(r)
    return kept, dropped, conflicts
