"""The rich summary printed at the end of `tunelab data prepare`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.terminal import plain, print_warnings


def print_dataset_summary(meta: dict, out: str | Path, console: Console) -> None:
    rep = meta["report"]
    what = f"labels {', '.join(meta['labels'])}" if meta["labels"] else f"task {meta['task']}"
    console.print(f"[bold]dataset[/] {plain(out)} · fingerprint {meta['fingerprint']} · {plain(what)}")
    acc = Table(title="rows")
    acc.add_column("")
    acc.add_column("count", justify="right")
    acc.add_row("read", f"{rep['rows_read']:,}")
    for reason, n in rep["dropped"].items():
        acc.add_row(f"dropped: {reason}", f"{n:,}")
    acc.add_row("kept", f"{rep['rows_kept']:,}", style="bold")
    console.print(acc)
    changed = {**{k.removeprefix("clean."): v for k, v in rep.get("steps", {}).items()},
               **{f"PII {k} redacted": v for k, v in rep.get("pii", {}).items()}}
    if rep["repaired"].get("invalid_utf8_replaced"):
        changed["invalid UTF-8 bytes replaced (rows)"] = rep["repaired"]["invalid_utf8_replaced"]
    if changed:
        console.print("changed (rows): " + " · ".join(f"{k} {v:,}" for k, v in changed.items()), highlight=False)
    dup = rep.get("duplicates", {})
    if dup:
        console.print(f"duplicates: exact {dup['exact_dropped']:,} dropped, {dup['exact_conflicting_groups']:,} "
                      f"groups with conflicting labels dropped · near {dup['near_groups']:,} groups, "
                      f"{dup['near_dropped']:,} rows dropped, {dup['near_conflicting_groups']:,} groups with "
                      "conflicting labels kept whole in one split", highlight=False)
    if not meta["class_balance"]:
        console.print("splits: " + " · ".join(f"{k} {v:,}" for k, v in meta["splits"].items()), highlight=False)
        console.print(f"rejected rows with line numbers and reasons: {plain(Path(out) / 'rejected.jsonl')}")
        print_warnings(meta.get("warnings", []), console)
        return
    bal = Table(title="class balance")
    bal.add_column("split")
    for label in meta["labels"]:
        bal.add_column(plain(label), justify="right")
    bal.add_column("total", justify="right")
    for split, counts in meta["class_balance"].items():
        bal.add_row(split, *[f"{counts.get(label, 0):,}" for label in meta["labels"]], f"{meta['splits'][split]:,}")
    console.print(bal)
    console.print(f"rejected rows with line numbers and reasons: {plain(Path(out) / 'rejected.jsonl')}")
    print_warnings(meta.get("warnings", []), console)
