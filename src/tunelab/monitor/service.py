"""The monitor's moving parts and how they run together.

Sources (a folder watcher, standard input, POST /ingest) put `Work` on one bounded queue. The `Pipeline` thread
takes work until it has `max_batch` documents or `max_wait_ms` passed, checks each document (a bad one is counted
by reason and logged, never stops the stream), scores the batch (sentiment, entities), and stores it in one
transaction with the aggregates, the sources' positions and the alerts the rules raise (`store.Store.ingest`). Only
then is the work answered (an HTTP 200, a file's next read): what a source was told is stored, is. Alerts go to
the log and Prometheus at once, to webhooks from the outbox (`alerts.Dispatcher`, its own thread). Servers named
under `watch:` are polled by a `watch.ServeWatcher` thread; their drift alerts take the same way out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter as Tally

from tunelab.config import MonitorConfig
from tunelab.monitor.alerts import Dispatcher
from tunelab.monitor.documents import Rejected, parse_document
from tunelab.monitor.metrics import MonitorMetrics
from tunelab.monitor.rules import RuleSet
from tunelab.monitor.sources import FolderReader, FolderSource, StdinSource, Work
from tunelab.monitor.store import Deliveries, Scored, Store, Views, database_url
from tunelab.monitor.watch import ServeWatcher

log = logging.getLogger("tunelab.monitor")

QUEUE_WORKS = 256  # work items waiting; beyond, POST /ingest answers 503 and the other sources wait
LOGGED_PER_REASON = 20  # rejected documents logged one by one per reason, then every 1000th


class Pipeline(threading.Thread):
    """Batches work from the queue, scores, stores; `submit(work)` from any thread."""

    def __init__(self, cfg: MonitorConfig, store: Store, score, find, metrics: MonitorMetrics):
        super().__init__(name="monitor-pipeline", daemon=True)
        self.cfg, self.store, self.score, self.find, self.metrics = cfg, store, score, find, metrics
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=QUEUE_WORKS)
        self.stopping = threading.Event()
        self.rejected_seen: Tally = Tally()
        self.idle = threading.Event()
        metrics.queue_depth.set_function(self.queue.qsize)

    def submit(self, work: Work, block: bool = True) -> None:
        """Queue `work`; with `block=False`, `queue.Full` when the queue is full."""
        self.queue.put(work, block=block)

    def run(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                self.idle.set()
                if self.stopping.is_set():
                    return
                continue
            self.idle.clear()
            works, n = [first], len(first.items)
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            while n < self.cfg.max_batch:
                try:
                    w = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                works.append(w)
                n += len(w.items)
            self.process(works)

    def drain(self, timeout: float = 60) -> None:
        """Stop once the queued work is stored (or `timeout` passed)."""
        self.stopping.set()
        self.join(timeout)

    def process(self, works: list[Work]) -> list[dict]:
        """Ingest `works` as one batch and answer each -> its counts (stored, duplicates, rejected, reasons)."""
        try:
            with self.metrics.batch_seconds.time():
                counts = self._ingest(works)
        except Exception as err:  # noqa: BLE001 - a bug or the database gone: logged, each waiting source told
            log.exception("a batch of %d work items failed; nothing of it was stored", len(works))
            for w in works:
                if w.done is not None:
                    w.done.set_exception(err)
            return []
        for w, c in zip(works, counts):
            if w.done is not None:
                w.done.set_result(c)
        return counts

    def _ingest(self, works: list[Work]) -> list[dict]:
        docs, owner, reasons = [], [], [Tally() for _ in works]
        rejects: Tally = Tally()
        for i, w in enumerate(works):
            for raw in w.items:
                try:
                    if isinstance(raw, Rejected):
                        raise raw
                    docs.append(parse_document(raw, w.source, self.cfg.sources.fields, self.cfg.max_text_chars))
                    owner.append(i)
                except Rejected as why:
                    reasons[i][why.reason] += 1
                    rejects[(w.source, why.reason)] += 1
                    self._log_rejected(w.source, why)
        known = self.store.known([d.id for d in docs])  # a replay is not scored again (the store re-checks)
        fresh = [d for d in docs if d.id not in known]
        texts = [d.text for d in fresh]
        labels, entities = self.score(texts), self.find(texts)
        scored = [Scored(d, lab, neg, score, ents) for d, (lab, neg, score), ents in zip(fresh, labels, entities)]
        result = self.store.ingest(scored, dict(rejects), [w.position for w in works if w.position is not None])
        counts = [{"stored": 0, "duplicates": 0, "rejected": sum(r.values()), "reasons": dict(r)} for r in reasons]
        claimed = set()
        for d, i in zip(docs, owner):
            if d.id in result.stored and d.id not in claimed:
                claimed.add(d.id)
                counts[i]["stored"] += 1
            else:
                counts[i]["duplicates"] += 1
        m = self.metrics
        m.documents.labels("stored").inc(len(result.stored))
        m.documents.labels("duplicate").inc(len(docs) - len(result.stored))
        m.documents.labels("rejected").inc(result.rejected)
        for (_, reason), k in rejects.items():
            m.rejected.labels(reason).inc(k)
        for alert in result.alerts:
            m.alert(alert)
            log.warning("ALERT %s", alert["message"])
        return counts

    def _log_rejected(self, source: str, why: Rejected) -> None:
        self.rejected_seen[why.reason] += 1
        k = self.rejected_seen[why.reason]
        if k <= LOGGED_PER_REASON or k % 1000 == 0:
            log.warning("rejected a document from %s: %s (%d so far for this reason)", source, why, k)


class Monitor:
    """The parts of one monitor, built from its config: `start()` the threads, `stop()` them (queued work stored)."""

    def __init__(self, cfg: MonitorConfig, score=None, find=None, stdin=None):
        watch = [w.name for w in cfg.entities.watchlist]
        self.cfg = cfg
        self.store = Store(database_url(cfg.state, cfg.database), cfg.window_s, RuleSet(cfg.rules, watch, cfg.window_s),
                           [h.url for h in cfg.alerts.webhooks])
        self.views = Views(self.store)
        self.metrics = MonitorMetrics(watch)
        if (score is None or find is None) and cfg.sentiment is not None:
            from tunelab.monitor.scoring import EntityFinder, SentimentScorer  # torch and the models: only here

            score = score or SentimentScorer(cfg.sentiment)
            find = find or EntityFinder(cfg.entities)
        self.pipeline = Pipeline(cfg, self.store, score, find, self.metrics)
        self.stop_event = threading.Event()
        self.dispatcher = Dispatcher(Deliveries(self.store), cfg.alerts.webhooks, cfg.window_s, self.stop_event,
                                     self.metrics)
        self.sources: list[threading.Thread] = []
        if cfg.sources.folder is not None:
            folder = cfg.sources.folder
            reader = FolderReader(folder.path, folder.patterns, self.store, cfg.max_batch)
            self.sources.append(FolderSource(reader, self.pipeline.submit, folder.poll_s, self.stop_event))
        if cfg.watch:
            self.sources.append(ServeWatcher(cfg.watch, self.store, self.metrics, self.stop_event, cfg.window_s))
        self.stdin = None
        if cfg.sources.stdin and stdin is not None:
            self.stdin = StdinSource(stdin, self.pipeline.submit, self.stop_event)
            self.sources.append(self.stdin)

    def start(self) -> None:
        self.pipeline.start()
        self.dispatcher.start()
        for s in self.sources:
            s.start()

    def stop(self, timeout: float = 60) -> None:
        self.stop_event.set()
        for s in self.sources:
            if s is not self.stdin:  # a thread blocked reading stdin ends with the process (it is a daemon)
                s.join(timeout)
        self.pipeline.drain(timeout)
        self.dispatcher.join(5)
        self.store.close()
