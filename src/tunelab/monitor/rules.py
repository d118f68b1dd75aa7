"""Alert rules (config `rules:`) evaluated on the windows an ingest changed, inside its transaction.

Each rule looks at the windows of the entities in its scope whose volume reaches `min_volume`:
- threshold: the window's metric >= `above` (or <= `below`);
- zscore: the window's z-score against the `baseline_windows` before it >= `above` (or <= `below`), once the stream
  had documents in half of those windows (a monitor just started has no baseline);
- page_hinkley: the Page-Hinkley statistic over the per-window values since the rule's last alert for the entity
  (at most `baseline_windows` back) >= `above` for an increase (or >= -`below` of the negated values, a decrease);
- adwin: ADWIN finds a cut in the documents of those windows, in the direction `above`/`below` says (up by default
  for negatives, down for the mean score).
An alert is unique per (rule, entity, window) and a rule stays quiet for an entity for `cooldown_windows` windows
on either side of its alert (de-duplication and cool-down hold across restarts: they are read from the database).
"""

from __future__ import annotations

from tunelab.config import Rule
from tunelab.monitor.stats import Window, adwin_cut, page_hinkley, zscore
from tunelab.monitor.store import OVERALL


class RuleSet:
    def __init__(self, rules: list[Rule], watchlist: list[str], window_s: int):
        self.rules, self.watchlist, self.window_s = rules, set(watchlist), window_s
        self._history: dict[tuple[int, int], bool] = {}  # (baseline_windows, window) -> enough history, per evaluate

    def in_scope(self, rule: Rule, entity: str) -> bool:
        scope = rule.entities
        if scope == "overall":
            return entity == OVERALL
        if scope == "all":
            return entity != OVERALL
        if scope == "watchlist":
            return entity in self.watchlist
        return entity in scope

    def evaluate(self, store, conn, changed: dict[str, set[int]]) -> list[dict]:
        """The alerts the rules raise on `changed` (entity -> window starts), not yet stored."""
        alerts, self._history = [], {}
        for rule in self.rules:
            for entity, windows in changed.items():
                if not self.in_scope(rule, entity):
                    continue
                for w in sorted(windows):
                    alert = self._check(rule, store, conn, entity, w)
                    if alert is not None and not self._quiet(rule, store, conn, entity, w, alerts):
                        alerts.append(alert)
        return alerts

    def _quiet(self, rule: Rule, store, conn, entity: str, w: int, raised: list[dict]) -> bool:
        """Whether an alert of `rule` for `entity` within the cool-down of window `w` exists (stored or just raised)."""
        span = rule.cooldown_windows * self.window_s
        if any(a["rule"] == rule.name and a["entity"] == entity and abs(a["window"] - w) <= span for a in raised):
            return True
        return bool(store.alert_windows(conn, rule.name, entity, w - span, w + span))

    def _check(self, rule: Rule, store, conn, entity: str, w: int) -> dict | None:
        ws = self.window_s
        history = store.windows(conn, entity, w - rule.baseline_windows * ws, w)
        current = history[-1]
        if current.volume < max(rule.min_volume, 1):
            return None
        value = current.value(rule.metric)
        if rule.kind == "threshold":
            return self._alert(rule, entity, current, value, None, _passes(value, rule), "")
        if not self._enough_history(rule, store, conn, w):
            return None
        if rule.kind == "zscore":
            z = zscore(current, history[:-1], rule.metric)
            return None if z is None else self._alert(rule, entity, current, value, z, _passes(z, rule), f"z={z:.1f}")
        since = store.alert_windows(conn, rule.name, entity, history[0].start, w - ws)
        if since:
            history = [h for h in history if h.start > max(since)]
        if rule.kind == "page_hinkley":
            up = rule.above is not None
            values = [h.value(rule.metric) * (1 if up else -1) for h in history]
            stat = page_hinkley(values, rule.delta)
            limit = rule.above if up else -rule.below
            return self._alert(rule, entity, current, value, stat, stat >= limit, f"Page-Hinkley {stat:.2f}")
        cut = adwin_cut(history, rule.metric, rule.delta)
        if cut is None:
            return None
        up = rule.below is None and (rule.above is not None or rule.metric != "mean_score")
        return self._alert(rule, entity, current, value, cut[1], (cut[1] > 0) == up, f"ADWIN change {cut[1]:+.2f}")

    def _enough_history(self, rule: Rule, store, conn, w: int) -> bool:
        """Whether the stream had documents in at least half of the `baseline_windows` before `w`: before that (a
        monitor just started) a baseline says nothing, and every entity would look like a burst."""
        key = (rule.baseline_windows, w)
        if key not in self._history:
            first = w - rule.baseline_windows * self.window_s
            active = sum(1 for h in store.windows(conn, OVERALL, first, w - self.window_s) if h.volume)
            self._history[key] = active >= max(2, rule.baseline_windows // 2)
        return self._history[key]

    @staticmethod
    def _alert(rule: Rule, entity: str, window: Window, value: float, statistic, fired: bool, why: str):
        if not fired:
            return None
        who = "the whole stream" if entity == OVERALL else entity
        message = (f"{rule.name}: {who} {rule.metric} {value:.3g} in the window of {window.volume} documents"
                   + (f" ({why})" if why else ""))
        return {"rule": rule.name, "entity": entity, "window": window.start, "metric": rule.metric, "value": value,
                "statistic": statistic, "volume": window.volume, "message": message}


def _passes(x: float, rule: Rule) -> bool:
    return (rule.above is not None and x >= rule.above) or (rule.below is not None and x <= rule.below)
