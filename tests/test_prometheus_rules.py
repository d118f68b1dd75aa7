"""The Prometheus rules shipped for `tunelab serve` (deploy/prometheus): well-formed, built on metric names the server
really exports, and (with promtool) valid and passing their unit tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tunelab.serve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "tunelab-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tunelab-rules.test.yml"

ALERTS = {"TunelabHighErrorRate", "TunelabHighLatency", "TunelabSaturated", "TunelabRejecting",
          "TunelabModelReloadFailed", "TunelabDriftDetected", "TunelabEmbeddingDrift", "TunelabPredictionShift",
          "TunelabDriftChecksStalled"}
ROLLBACK_ALERTS = {"TunelabDriftDetected", "TunelabEmbeddingDrift", "TunelabPredictionShift"}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
RATE_ARG = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
PROSE_NAME = re.compile(r"\btunelab_[a-z0-9_]+")


def _groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def _rules() -> list[dict]:
    return [rule for group in _groups() for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def _identifiers(expr: str) -> set[str]:
    """Metric names (and recorded series) an expression selects: identifiers outside strings, less PromQL words."""
    bare = STRING.sub('""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges and subqueries
    return {n for n in IDENT.findall(bare) if n.startswith("tunelab_") or ":" in n}


def _exposition() -> dict[str, str]:
    """Sample name -> metric type, from the text a fresh server's GET /metrics renders once every family has a
    labelled child."""
    m = Metrics()
    m.requests.labels("/v1/classify", "200").inc()
    m.rejections.labels("overload").inc()
    m.queue_depth.labels("m").set(1)
    m.queue_capacity.labels("m").set(8)
    m.running.labels("m").set(1)
    m.ttft.labels("m").observe(0.1)
    m.latency.labels("/v1/classify").observe(0.2)
    m.generated_tokens.labels("m").inc(3)
    m.prompt_tokens.labels("m").inc(5)
    m.reloads.labels("m", "failed").inc()
    m.version.labels("m", "m:0123456789ab").set(1)
    m.drift_p.labels("m", "embedding_mmd").set(0.5)
    m.drift_stat.labels("m", "embedding_mmd").set(0.01)
    m.drift_detected.labels("m").set(0)
    m.drift_window.labels("m").set(10)
    m.drift_checks.labels("m").inc()
    m.drift_observed.labels("m").inc(10)
    samples = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            samples[sample.name] = family.type
    return samples


def test_rule_expressions_use_metric_names_the_server_exports():
    samples = _exposition()
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", name) for name in samples}
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    problems = []
    for rule in _rules():
        name, expr = rule.get("alert") or rule["record"], rule["expr"]
        for ident in sorted(_identifiers(expr)):
            if ":" in ident:
                if ident not in recorded:
                    problems.append(f"{name}: {ident} is recorded by no rule of the file")
            elif ident not in samples or ident.endswith("_created"):
                problems.append(f"{name}: {ident} is no sample of the server's /metrics")
            elif ident.endswith("_bucket") and samples[ident] != "histogram":
                problems.append(f"{name}: {ident} is not a histogram's bucket")
        for arg in RATE_ARG.findall(STRING.sub('""', expr)):
            if ":" not in arg and samples.get(arg) not in ("counter", "histogram"):
                problems.append(f"{name}: rate/increase of {arg}, which is no counter")
        for text in rule.get("annotations", {}).values():
            for ident in PROSE_NAME.findall(text):
                if ident not in samples and ident not in families:
                    problems.append(f"{name}: its annotations name {ident}, which the server does not export")
    assert not problems, "\n".join(problems)
    used = {i for rule in _rules() for i in _identifiers(rule["expr"])}
    assert {"tunelab_requests_total", "tunelab_request_latency_seconds_bucket", "tunelab_queue_capacity",
            "tunelab_drift_p_value", "tunelab_drift_checks_total"} <= used


def test_rules_file_is_well_formed():
    groups = _groups()
    assert [g["name"] for g in groups] == ["tunelab-serving", "tunelab-drift"]
    for rule in _rules():
        assert ("alert" in rule) != ("record" in rule), rule
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), rule
        if "record" in rule:
            assert ":" in rule["record"], f"recorded series are named level:metric:operations: {rule['record']}"
    alerts = _alerts()
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), f"alert names repeat: {names}"
    assert ALERTS <= set(names)
    for a in alerts:
        assert DURATION.match(str(a.get("for", ""))), f"{a['alert']}: for {a.get('for')!r}"
        assert a.get("labels", {}).get("severity") in SEVERITIES, a["alert"]
        annotations = a.get("annotations", {})
        assert annotations.get("summary"), a["alert"]
        assert "$labels." in annotations.get("description", ""), f"{a['alert']}: its description names no label"
    drift = next(g for g in groups if g["name"] == "tunelab-drift")["rules"]
    for a in drift:
        assert "$labels.model" in a["annotations"]["description"], a["alert"]
        assert "tunelab monitor drift MODEL --current LOG" in a["annotations"]["description"], a["alert"]
    for a in alerts:
        if a["alert"] in ROLLBACK_ALERTS:
            description = a["annotations"]["description"]
            assert "tunelab registry rollback NAME" in description and "tunelab_model_version_info" in description


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES.name]
    firing, quiet = set(), set()
    for case in tests["tests"]:
        assert case["input_series"], case
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
            for exp in t.get("exp_alerts") or []:
                assert exp["exp_labels"].get("severity") and exp["exp_annotations"].get("description"), t
    names = {a["alert"] for a in _alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_lines_fit():
    for path in (RULES, RULE_TESTS):
        long = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
        assert not long, f"{path.name}: lines over 120 characters: {long}"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("TUNELAB_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool is not on PATH but TUNELAB_REQUIRE_PROMTOOL=1 (install Debian's prometheus package)")
    pytest.skip("promtool is not installed (apt-get install prometheus)")


@pytest.mark.parametrize("command", [["check", "rules", RULES], ["test", "rules", RULE_TESTS]],
                         ids=["check", "test"])
def test_promtool(command):
    done = subprocess.run([_promtool(), *map(str, command)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(map(str, command))}:\n{done.stdout}\n{done.stderr}"
