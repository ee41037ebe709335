"""deploy/prometheus and deploy/grafana: the alert rules are valid and fire on the series
they are for (promtool, from Debian's prometheus package), and the dashboards are well
formed and their queries parse. That those name only exported series is checked against real scrapes
in tests/integration/test_metrics.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/system-deps.sh installs it)"
)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config() -> None:
    assert "SUCCESS: 10 rules found" in promtool("check", "rules", "fedge-rules.yml")
    promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_each_alert_fires_on_its_series_and_not_before() -> None:
    assert "SUCCESS" in promtool("test", "rules", "fedge-rules.test.yml")


def test_every_alert_has_a_severity_a_summary_and_a_unit_test() -> None:
    (group,) = yaml.safe_load((PROMETHEUS / "fedge-rules.yml").read_text())["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    tests = yaml.safe_load((PROMETHEUS / "fedge-rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    # alerts over rates of several series are not unit-tested here: their arithmetic is
    # checked by promtool's parser above
    assert set(alerts) - tested == {"FedgeNodeDown", "FedgeClientsFailing", "FedgeUploadsRejected"}


@pytest.mark.parametrize("board", sorted((DEPLOY / "grafana").glob("*.json")), ids=lambda p: p.name)
def test_dashboards_are_well_formed(board: Path) -> None:
    dashboard = json.loads(board.read_text())
    assert dashboard["uid"] and dashboard["title"].startswith("fedge")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job="$job"' in target["expr"], (panel["title"], target["expr"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule that promtool
    parses."""
    rules = []
    for board in sorted((DEPLOY / "grafana").glob("*.json")):
        for panel in json.loads(board.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "2m").replace("$job", "j")
                rules.append({"record": f"dashboard:query{len(rules)}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", str(path))
