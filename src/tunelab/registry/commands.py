"""`tunelab registry register|list|show|promote|rollback|diff|log`: thin commands over `Registry`, printing
tables (or JSON with --json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from tunelab.terminal import make_console

registry_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           short_help="register | list | show | promote | rollback | diff | log",
                           help="Versions of model dirs (content-addressed, immutable), aliases that move, and the "
                                "log of every move. The registry folder: --registry, else TUNELAB_REGISTRY, else "
                                "~/.local/share/tunelab/registry; its database: SQLite inside it, or --db / "
                                "TUNELAB_REGISTRY_DB (e.g. postgresql+psycopg://user@host/registry).")
console = make_console()

REGISTRY = typer.Option(None, "--registry", help="the registry folder (default: TUNELAB_REGISTRY, else "
                        "~/.local/share/tunelab/registry)")
DB = typer.Option(None, "--db", help="a database URL instead of the folder's SQLite file (default: "
                  "TUNELAB_REGISTRY_DB)")
AS_JSON = typer.Option(False, "--json", help="print JSON instead of a table")
REASON = typer.Option(None, "--reason", help="why: kept in the log")


def _open(registry: Optional[Path], db: Optional[str]):
    from tunelab.registry.registry import Registry

    return Registry(registry, db)


def _query(registry: Optional[Path], db: Optional[str], as_json: bool, call):
    """`call(registry)` on the open registry; printed as JSON (-> None) with --json, else returned for a table."""
    with _open(registry, db) as reg:
        result = call(reg)
    if as_json:
        console.print_json(json.dumps(result, ensure_ascii=False))
        return None
    return result


def _short(version: str | None) -> str:
    return version[:12] if version else "-"


def _metric(record: dict) -> str:
    """The version's headline validation figure, for tables."""
    val = ((record["lineage"].get("metrics") or {}).get("validation") or {})
    for key in ("macro_f1", "entity_f1", "perplexity"):
        if key in val:
            return f"{key} {val[key]:.4f}"
    return "-"


def _gate(record: dict) -> str:
    """An update's gate and its changes on the old and the new test split; '-' for a version that is no update."""
    gate = record["lineage"].get("gate")
    if not gate:
        return "-"
    verdict = "passed" if gate.get("passed") else "FAILED"
    if not isinstance(gate.get("drop"), (int, float)) or not isinstance(gate.get("gain"), (int, float)):
        return verdict  # a gate recorded without its figures
    sign = -1 if gate.get("relative") else 1
    return f"{verdict} (old {-sign * gate['drop']:+.4f}, new {sign * gate['gain']:+.4f})"


@registry_app.command("register")
def register(model_dir: Path = typer.Argument(..., help="a tunelab model dir (a run's model/) or export dir"),
             name: str = typer.Option(..., "--name", help="the model line it belongs to, e.g. tweets-sentiment"),
             reason: Optional[str] = REASON, registry: Optional[Path] = REGISTRY, db: Optional[str] = DB,
             as_json: bool = AS_JSON):
    """Copy a model dir into the store (its content hash is the version) with its lineage."""
    with _open(registry, db) as reg:
        rec = reg.register(model_dir, name, reason)
    if as_json:
        console.print_json(json.dumps({k: v for k, v in rec.items() if k != "files"}, ensure_ascii=False))
        return
    parent = (rec["lineage"].get("parent") or {}).get("version")  # NAME:VERSION
    parent = f" · parent {parent.split(':')[0]}:{_short(parent.split(':')[1])}" if parent else ""
    console.print(f"registered {rec['name']}:{_short(rec['version'])} ({rec['kind']}, {rec['task']}, "
                  f"{len(rec['files'])} files) · validation {_metric(rec)} · update gate {_gate(rec)}{parent}",
                  highlight=False, soft_wrap=True)


@registry_app.command("list")
def list_versions(name: Optional[str] = typer.Argument(None, help="one model line (default: all)"),
                  registry: Optional[Path] = REGISTRY, db: Optional[str] = DB, as_json: bool = AS_JSON):
    """Registered versions, oldest first, with the aliases pointing at them."""
    with _open(registry, db) as reg:
        rows = reg.list(name)
    if as_json:
        console.print_json(json.dumps([{k: v for k, v in r.items() if k not in ("files", "lineage")} for r in rows]))
        return
    t = Table(title=f"{name + ' in ' if name else ''}registry {reg.root}")
    cols = ("version", "registered (UTC)", "task", "method", "validation", "update gate", "aliases")
    for col in cols if name else ("name", *cols):
        t.add_column(col, no_wrap=col in ("version", "registered (UTC)", "validation"))
    for r in rows:
        cells = (_short(r["version"]), r["registered_at"][:19].replace("T", " "), r["task"] or "-",
                 r["lineage"].get("method") or "-", _metric(r), _gate(r), ", ".join(r["aliases"]) or "-")
        t.add_row(*(cells if name else (r["name"], *cells)))
    console.print(t)


@registry_app.command("show")
def show(ref: str = typer.Argument(..., help="NAME@ALIAS, NAME:VERSION or NAME (its newest)"),
         registry: Optional[Path] = REGISTRY, db: Optional[str] = DB, verify: bool = typer.Option(
             False, "--verify", help="check every file of the version against its hash")):
    """One version: lineage, gate, aliases, files (as JSON)."""
    with _open(registry, db) as reg:
        rec, path = reg.resolve(ref) if verify else (reg.show(ref), None)
    out = {**rec, "path": str(path or reg.store / rec["version"]), **({"verified": True} if verify else {})}
    console.print_json(json.dumps(out, ensure_ascii=False))


@registry_app.command("promote")
def promote(ref: str = typer.Argument(..., help="the version: NAME:VERSION, NAME@ALIAS or NAME (its newest)"),
            alias: str = typer.Option(..., "--alias", help="the alias to move, e.g. production or staging"),
            reason: Optional[str] = REASON,
            override_gate: bool = typer.Option(False, "--override-gate", help="promote a version whose update "
                                               "gate failed (needs --reason; logged)"),
            registry: Optional[Path] = REGISTRY, db: Optional[str] = DB):
    """Point an alias at a version (the move and its reason are logged)."""
    with _open(registry, db) as reg:
        ev = reg.promote(ref, alias, reason, override_gate)
    _print_move(ev)


@registry_app.command("rollback")
def rollback(name: str = typer.Argument(..., help="the model line"),
             alias: str = typer.Option("production", "--alias", help="the alias to move back"),
             reason: Optional[str] = REASON, registry: Optional[Path] = REGISTRY, db: Optional[str] = DB):
    """Move an alias back to the version it pointed at before its last promote."""
    with _open(registry, db) as reg:
        ev = reg.rollback(name, alias, reason)
    _print_move(ev)


def _print_move(ev: dict) -> None:
    override = " [bold red](gate overridden)[/]" if ev["override"] else ""
    console.print(f"{ev['action']}: {ev['name']}@{ev['alias']} {_short(ev['previous'])} → {_short(ev['version'])}"
                  f"{override} · event {ev['id']} · {ev['at'][:19].replace('T', ' ')} UTC by {ev['actor']}",
                  highlight=False, soft_wrap=True)


@registry_app.command("diff")
def diff(a: str = typer.Argument(..., help="a version reference"), b: str = typer.Argument(..., help="another"),
         registry: Optional[Path] = REGISTRY, db: Optional[str] = DB, as_json: bool = AS_JSON):
    """What differs between two versions: lineage (config, data, metrics, gate) and files."""
    d = _query(registry, db, as_json, lambda reg: reg.diff(a, b))
    if d is None:
        return
    t = Table(title=f"{d['a']} → {d['b']}")
    for col in ("key", d["a"], d["b"]):
        t.add_column(col, overflow="fold")
    for row in d["lineage"]:
        t.add_row(row["key"], _cell(row["a"]), _cell(row["b"]))
    console.print(t)
    console.print(f"files that differ: {', '.join(d['files']) or 'none'}", highlight=False, soft_wrap=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


@registry_app.command("log")
def log(name: str = typer.Argument(..., help="the model line"),
        alias: Optional[str] = typer.Option(None, "--alias", help="only this alias's moves"),
        registry: Optional[Path] = REGISTRY, db: Optional[str] = DB, as_json: bool = AS_JSON):
    """Every registration and alias move, oldest first: when, who, what, from what, why."""
    events = _query(registry, db, as_json, lambda reg: reg.log(name, alias))
    if events is None:
        return
    t = Table(title=f"log of {name}{f'@{alias}' if alias else ''}")
    for col in ("#", "time (UTC)", "action", "alias", "from", "to", "by", "reason"):
        t.add_column(col, no_wrap=col in ("time (UTC)", "from", "to"))
    for e in events:
        action = e["action"] + (" (gate overridden)" if e["override"] else "")
        t.add_row(str(e["id"]), e["at"][:19].replace("T", " "), action, e["alias"] or "-", _short(e["previous"]),
                  _short(e["version"]), e["actor"], e["reason"] or "")
    console.print(t)
