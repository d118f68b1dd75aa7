"""`tunelab monitor run CONFIG`, `tunelab monitor demo` (thin commands over `service.Monitor`) and `tunelab monitor
drift MODEL --current LOG` (over `drift.drift_report`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from tunelab.config import MonitorConfig, load_monitor_config
from tunelab.errors import UserError
from tunelab.terminal import make_console, plain

monitor_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, short_help="run | demo | drift",
                          help="A stream of documents (a folder of JSONL/CSV files, standard input, POST /ingest) -> "
                               "sentiment and entities -> per-entity windows in a database -> alert rules -> alerts "
                               "(log, webhooks, /metrics) and a dashboard.")
console = make_console()


def check_http(cfg: MonitorConfig) -> list[str]:
    """The API keys of the HTTP side ([] without); a non-loopback address without keys is a `UserError`."""
    from tunelab.serve.auth import ENV_KEYS, is_loopback, read_keys

    if not cfg.http.enabled:
        return []
    keys = read_keys(cfg.http.api_keys_file)
    if not keys and not is_loopback(cfg.http.host):
        raise UserError(f"refusing to listen on {cfg.http.host} without API keys: set {ENV_KEYS} or "
                        "http.api_keys_file (or bind 127.0.0.1)")
    return keys


def serve_http(monitor, keys: list[str], out=print) -> None:
    """The monitor's HTTP side until SIGTERM / Ctrl-C (in-flight requests finish first)."""
    from tunelab.monitor.http import create_app
    from tunelab.serve.server import run_guarded

    settings = monitor.cfg.http
    guard = create_app(settings, keys, monitor)

    def banner(host: str, port: int) -> None:
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        auth = '-H "Authorization: Bearer $KEY" ' if keys else ""
        out(plain(f"tunelab monitor on {url}   (dashboard: {url}/ , metrics: {url}/metrics)"))
        out(plain(f"  ingest: curl {url}/ingest {auth}-H 'Content-Type: application/json' -d '{{\"documents\": "
                  f"[{{\"id\": \"1\", \"timestamp\": \"2026-01-05T09:30:00Z\", \"text\": \"...\"}}]}}'"))
        sys.stdout.flush()

    run_guarded(guard, settings, banner, lifespan="off")


def _until_signal(done: threading.Event) -> None:
    """Wait for SIGTERM / SIGINT (or `done`)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.is_set() and not done.is_set():
            stop.wait(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_monitor(cfg: MonitorConfig, out=print, stdin=None) -> dict:
    """Run until SIGTERM / Ctrl-C (or, reading only standard input, its end) -> the overview at the end."""
    from tunelab.monitor.service import Monitor

    if not (cfg.http.enabled or cfg.sources.folder or cfg.sources.stdin or cfg.watch):
        raise UserError("nothing to read: enable http, sources.folder or sources.stdin, or watch a server")
    if cfg.sources.folder is not None and not Path(cfg.sources.folder.path).is_dir():
        raise UserError(f"sources.folder.path {cfg.sources.folder.path} is not a folder")
    keys = check_http(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    monitor = Monitor(cfg, stdin=stdin if cfg.sources.stdin else None)
    monitor.start()
    try:
        if cfg.sources.folder is not None:
            out(plain(f"watching {cfg.sources.folder.path} ({', '.join(cfg.sources.folder.patterns)})"))
        for t in cfg.watch:
            out(plain(f"watching the drift of the models served at {t.url} (every {t.poll_s:g} s)"))
        if cfg.http.enabled:
            serve_http(monitor, keys, out)
        elif cfg.sources.folder is None and not cfg.watch:
            _until_signal(monitor.stdin.finished)
        else:
            _until_signal(threading.Event())
    finally:
        monitor.stop()
    return _summary(cfg, out)


def _summary(cfg: MonitorConfig, out) -> dict:
    from tunelab.monitor.store import Store, Views, database_url

    store = Store(database_url(cfg.state, cfg.database), cfg.window_s)
    try:
        view = Views(store).overview()
    finally:
        store.close()
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(view["rejected"].items())) or "none"
    out(plain(f"stored {view['documents']} documents (rejected: {rejected}); {view['alerts']} alerts"))
    return view


@monitor_app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="the monitor's YAML config"),
            overrides: Optional[list[str]] = typer.Argument(None, help="dotted key=value overrides")):
    """Run the monitor: read its sources, score, store, raise alerts, serve the dashboard and POST /ingest."""
    cfg = load_monitor_config(config, overrides)
    run_monitor(cfg, out=console.print, stdin=sys.stdin.buffer)


def _wait_read(monitor, files: list[Path], say, timeout_s: float = 1800) -> None:
    """Until the monitor has committed every byte of `files`."""
    start = last = time.monotonic()
    while True:
        done = all((monitor.store.position(str(f.resolve())) or (0, ""))[0] >= f.stat().st_size for f in files)
        if done or time.monotonic() - start > timeout_s:
            return
        if time.monotonic() - last >= 5:
            say(f"  … {monitor.views.overview()['documents']} documents stored")
            last = time.monotonic()
        time.sleep(0.2)


def print_state(views, say) -> None:
    """The per-entity table and the alerts, as the dashboard shows them."""
    from datetime import datetime, timezone

    from rich.table import Table

    view = views.overview()
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(view["rejected"].items())) or "none"
    share = view["negatives"] / view["documents"] if view["documents"] else 0
    say(f"stored {view['documents']} documents, {share:.0%} negative; rejected: {rejected}")
    table = Table("entity", "documents", "negative", "mean score", "alerts", box=None, pad_edge=False)
    for e in view["entities"]:
        table.add_row(plain(e["name"]), str(e["volume"]), f"{e['share_negative']:.0%}", f"{e['mean_score']:+.2f}",
                      str(e["alerts"]))
    console.print(table)
    alerts = views.alerts(100)
    say(f"{len(alerts)} alert(s):")
    for a in reversed(alerts):
        start = datetime.fromtimestamp(a["window"], timezone.utc).strftime("%Y-%m-%d %H:%M")
        say(plain(f"  [{start} UTC] {a['message']}"))


@monitor_app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/monitor-demo"), "--out", help="the demo's folder (model, inbox, "
                                      "database, monitor.yaml)"),
             model: Optional[Path] = typer.Option(None, "--model", help="a tweets sentiment model dir (default: "
                                                  "MiniLM fine-tuned on 3,000 tweets, once)"),
             serve: bool = typer.Option(True, "--serve/--no-serve", help="serve the dashboard afterwards (Ctrl-C "
                                        "stops)"),
             port: int = typer.Option(8100, "--port", help="the dashboard's port")):
    """Replay the built-in tweets as a stream of company mentions with an injected negative burst; print the
    alerts; serve the dashboard."""
    from tunelab.monitor.demo import prepare_demo
    from tunelab.monitor.service import Monitor

    path, info = prepare_demo(out, model, console.print)
    t0 = time.monotonic()
    cfg = load_monitor_config(path, [f"http.port={port}"])
    keys = check_http(cfg) if serve else []
    console.print(plain(f"replaying {info['stream']} tweets over 48 hourly windows, and a burst of {info['burst']} "
                        f"negative tweets about {info['target']} in one hour (config: {path})"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    monitor = Monitor(cfg)
    monitor.start()
    try:
        _wait_read(monitor, sorted(Path(cfg.sources.folder.path).iterdir()), console.print)
        console.print(f"read in {time.monotonic() - t0:.0f} s")
        print_state(monitor.views, console.print)
        if serve:
            serve_http(monitor, keys, console.print)
    finally:
        monitor.stop()


@monitor_app.command("drift")
def drift_cmd(model: Path = typer.Argument(..., help="a classification model dir with a drift profile (every "
                                           "classifier tunelab trains has one)"),
              current: list[Path] = typer.Option(..., "--current", help="a request log folder (tunelab serve "
                                                 "--request-log), or JSONL/CSV files with a text column; repeatable"),
              out: Path = typer.Option(Path("drift-report"), "--out", help="the report folder"),
              model_id: Optional[str] = typer.Option(None, "--model-id", help="only records of this served model "
                                                     "id (a log of several models)"),
              since: Optional[str] = typer.Option(None, "--since", help="only texts at or after this time (ISO 8601 "
                                                  "or Unix seconds)"),
              until: Optional[str] = typer.Option(None, "--until", help="only texts before this time"),
              last: Optional[int] = typer.Option(None, "--last", min=1, help="only the last N texts"),
              window: Optional[int] = typer.Option(None, "--window", min=20, help="also a check per run of N texts"),
              text_column: str = typer.Option("text", "--text-column", help="the column holding the text"),
              reference: Optional[Path] = typer.Option(None, "--reference", help="a dataset dir: compare with its "
                                                       "validation split instead of the model dir's profile (a "
                                                       "model dir written before profiles were)"),
              alpha: float = typer.Option(0.01, "--alpha", min=1e-9, max=0.5, help="the family-wise false-alarm "
                                          "rate of one check (Bonferroni over the statistics)"),
              overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier report in --out")):
    """A drift report of a window of texts against the model's reference profile: drift.json and PNGs."""
    from tunelab.monitor.drift import drift_report  # torch and the model: only for this command

    r = drift_report(model, current, out, model_id, since, until, last, window, alpha, overwrite=overwrite,
                     text_column=text_column, reference=reference)
    cur = r["current"]
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(cur["skipped"].items())) or "none"
    console.print(plain(f"{cur['texts']} texts ({cur['first'] or '?'} to {cur['last'] or '?'}; skipped: {skipped}) "
                        f"against {r['reference']['rows']} {r['reference']['source']} rows of the profile"))
    from rich.table import Table  # rich's tables: only for the commands that print one

    table = Table("statistic", "value", "p-value", "", box=None, pad_edge=False)
    for name, s in r["statistics"].items():
        table.add_row(name, f"{s['statistic']:.4g}", f"{s['p_value']:.2g}",
                      "DRIFT" if s["p_value"] < r["threshold"] else "")
    console.print(table)
    ref, now = r["summary"]["reference"], r["summary"]["window"]
    console.print(plain(f"mean confidence {ref['mean_confidence']:.3f} -> {now['mean_confidence']:.3f}; labels "
                        + ", ".join(f"{lab} {a:.0%} -> {b:.0%}" for lab, a, b in
                                    zip(r["labels"], ref["label_shares"], now["label_shares"]))))
    if r["windows"]:
        flagged = sum(w["drift"] for w in r["windows"])
        console.print(plain(f"{flagged} of {len(r['windows'])} windows of {window} texts drifted"))
    verdict = (f"DRIFT ({', '.join(r['drifted'])}; smallest p {r['p_min']:.2g} < {r['threshold']:.2g})"
               if r["drift"] else f"no drift (smallest p {r['p_min']:.2g} >= {r['threshold']:.2g})")
    console.print(plain(f"{verdict}; report: {out}/drift.json, {out}/drift.png"))
