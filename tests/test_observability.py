"""Prometheus rules and the Grafana dashboard: promtool checks, and every metric they name is exported.

The names are checked against a real `movinet-worker run` process's /metrics, not against
worker/pipeline/metrics.py, so a renamed or removed metric fails here rather than as an empty panel or an
alert that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS / "rules.yml"
DASHBOARD = GRAFANA / "dashboards" / "movinet.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What the dashboard must show (the brief of each panel group), by metric family.
DASHBOARD_MUST_SHOW = {
    "movinet_frames_received_total",
    "movinet_frames_stepped_total",
    "movinet_predictions_published_total",
    "movinet_capture_to_publish_seconds",
    "movinet_input_lag_seconds",
    "movinet_worker_input_lag_seconds",
    "movinet_batch_size",
    "movinet_model_step_seconds",
    "movinet_cameras_owned",
    "movinet_cameras_active",
    "movinet_frames_deadlettered_total",
    "movinet_leases_acquired_total",
    "movinet_leases_lost_total",
    "movinet_leases_taken_over_total",
    "movinet_redis_errors_total",
    "movinet_alerts_active",
    "movinet_alerts_opened_total",
    "movinet_alerts_closed_total",
    "movinet_action_alert_peak_score",
    "movinet_action_alert_start_timestamp_seconds",
}


# ---- PromQL names -------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: `movinet_*` and recording rules (`level:movinet_*:op`).

    String literals (label values, `label_values` arguments) are removed first, so a label value that
    happens to look like a metric name is not taken for one; Grafana variables (`$job`,
    `$__rate_interval`) are not identifiers starting with `movinet_`.
    """
    bare = _STRING.sub('""', expr)
    names = set()
    for match in _IDENT.finditer(bare):
        name = match.group()
        start = match.start()
        if start and bare[start - 1] in "$":
            continue  # a Grafana variable
        if name.startswith("movinet_") or (":" in name and ":movinet_" in f":{name}"):
            names.add(name)
    return names


class Exposition:
    """A /metrics page: sample names, and families from `# HELP` / `# TYPE` lines with their types."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: set[str] = set()
        self.types: dict[str, str] = {}
        self.helped: set[str] = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(None, 3)
                self.types[name] = kind.strip()
            elif line.startswith("# HELP "):
                self.helped.add(line.split(None, 3)[2])
            elif line and not line.startswith("#"):
                self.samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])

    def exports(self, name: str) -> bool:
        """Is `name` a series this target can have: a sample, a declared family, or a histogram's part?

        A labelled family with no child yet (e.g. alerts by rule before any alert) has no sample but
        is declared by its HELP and TYPE lines. `_bucket/_sum/_count` are only accepted on a family
        declared a histogram (`_sum/_count` also on a summary), never on a gauge or counter that
        happens to share the stem.
        """
        if name in self.samples or name in self.types:
            return True
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                kind = self.types.get(name[: -len(suffix)])
                if kind == "histogram" or (kind == "summary" and suffix != "_bucket"):
                    return True
        return False


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(board["panels"]) for t in p.get("targets", []) if "expr" in t]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else str(query))
    exprs += [a["expr"] for a in board.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def test_metric_names_are_extracted_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(movinet_capture_to_publish_seconds_bucket{job=~"$job", '
        'rule="movinet_not_a_metric"}[$__rate_interval]))) / job:movinet_frames_received:rate5m '
        "and on (job) up == 1 or label_values(movinet_worker_ready, job) + $movinet_var"
    )
    assert metric_names(expr) == {
        "movinet_capture_to_publish_seconds_bucket",
        "job:movinet_frames_received:rate5m",
        "movinet_worker_ready",
    }
    page = Exposition(
        "# HELP movinet_x_seconds h\n# TYPE movinet_x_seconds histogram\nmovinet_x_seconds_count 0.0\n"
        "# HELP movinet_g g\n# TYPE movinet_g gauge\nmovinet_g 1.0\n"
        "# HELP movinet_g_sum s\n# TYPE movinet_g_sum gauge\nmovinet_g_sum 1.0\n"
        "# HELP movinet_by_rule r\n# TYPE movinet_by_rule gauge\n"
    )
    assert page.exports("movinet_x_seconds_bucket") and page.exports("movinet_x_seconds_sum")
    assert page.exports("movinet_g_sum") and page.exports("movinet_by_rule")
    assert not page.exports("movinet_g_count") and not page.exports("movinet_g_bucket")
    assert not page.exports("movinet_missing")


# ---- promtool -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install -y prometheus); CI installs it")
    return path


def run_promtool(promtool: str, *args: str) -> None:
    proc = subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_promtool_checks_the_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str((PROMETHEUS / "rules_test.yml").relative_to(ROOT)))


def test_promtool_checks_the_prometheus_config(promtool: str) -> None:
    run_promtool(promtool, "check", "config", str((PROMETHEUS / "prometheus.yml").relative_to(ROOT)))


# ---- the rules' and the dashboard's own shape ---------------------------------------------------


def test_every_alert_has_severity_summary_description_runbook_and_a_unit_test() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert alerts
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())
    tested: dict[str, list[bool]] = {}
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            tested.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert re.fullmatch(r"deploy/README\.md#[a-z0-9-]+", annotations["runbook"]), name
        assert set(tested.get(name, [])) == {True, False}, f"{name}: no test of it firing and not firing"


def test_runbook_anchors_are_sections_of_the_deploy_readme() -> None:
    readme = ROOT / "deploy" / "README.md"
    if not readme.is_file():
        pytest.skip("deploy/README.md (the runbooks the alerts link to) is not written yet")
    headings = re.findall(r"^#+\s+(.+?)\s*$", readme.read_text(), flags=re.MULTILINE)
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    wanted = {r["annotations"]["runbook"].split("#", 1)[1] for r in rules() if "alert" in r}
    assert wanted <= anchors, f"runbook sections missing from deploy/README.md: {sorted(wanted - anchors)}"


def test_dashboard_is_valid_and_every_panel_queries_a_datasource() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and 36 <= board["schemaVersion"] <= 41
    names = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in names
    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] in {"row", "text"}:  # layout and prose: they query nothing
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}", panel["title"]
    text = " ".join(p["options"]["content"] for p in panels if p["type"] == "text")
    assert "`alerts` stream" in text  # where the action alert events themselves are


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "movinet.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    default = sources["datasources"][0]
    assert default["type"] == "prometheus"
    current = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert current["current"]["value"] == default["uid"]  # the dashboard's default data source


def test_recording_rules_used_are_defined() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    used = {n for r in rules() for n in metric_names(r["expr"])} | {
        n for e in dashboard_exprs(dashboard()) for n in metric_names(e)
    }
    assert {n for n in used if ":" in n} <= recorded


# ---- against a running worker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(redis_url: str, models: Any, labels600: list[str], tmp_path_factory: Any) -> Exposition:
    """/metrics of a real `movinet-worker run` after it served a camera and dead-lettered an entry."""
    import os
    import signal
    import sys
    import urllib.request
    import uuid

    import numpy as np

    from tests.harness import Harness
    from worker.config import key_env
    from worker.runner import check
    from worker.testing import free_port

    prefix = "t" + uuid.uuid4().hex[:10]
    folder = tmp_path_factory.mktemp("observability")
    labels, log = folder / "labels.txt", folder / "worker.log"
    labels.write_text("\n".join(labels600) + "\n")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MOVINET_MODEL": str(models.tflite),
        "MOVINET_LABELS": str(labels),
        "MOVINET_METRICS_PORT": str(port),
        "MOVINET_GRACE_SECONDS": "10",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **key_env(prefix),  # every Redis key the worker writes, private to this test
    }
    h = Harness(redis_url, None, labels600, prefix=prefix)
    with log.open("w") as stderr:  # a file, not a pipe nobody reads while the worker runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--block-ms", "20", "--discover-interval-seconds", "0.2"],
            env=env,
            cwd=ROOT,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}/metrics"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"movinet-worker run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        return check(url, None)[0]

    try:
        h.wait_for(ready, timeout=120, what="readiness")
        rng = np.random.default_rng(0)
        t0 = 1_700_000_000_000
        for i in range(4):
            h.publish_rgb("cam", t0 + i * 200, (rng.random((172, 172, 3)) * 255).astype(np.uint8), seq=i)
        h.client.xadd(h.frames_key("cam"), {"v": "1", "camera": "cam", "seq": "9"}, id=f"{t0 + 1000}-0")
        h.wait_for(lambda: len(h.predictions("cam")) == 4, what="predictions")
        h.wait_for(lambda: h.client.xlen(h.settings.deadletter_stream) == 1, what="dead letter")

        def page() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                text: str = response.read().decode()
                return text

        h.wait_for(lambda: 'movinet_input_lag_seconds{camera="cam"}' in page(), timeout=10, what="lag series")
        text = page()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        h.cleanup()
    return Exposition(text)


def test_a_running_worker_declares_labelled_families_before_their_first_sample(scraped: Exposition) -> None:
    # The fallback `exports` relies on: prometheus_client writes HELP and TYPE for every registered
    # family, samples or not. No alert rule is configured here, so the alert families have no child.
    for name, kind in {
        "movinet_alerts_active": "gauge",
        "movinet_alerts_opened_total": "counter",
        "movinet_alerts_closed_total": "counter",
    }.items():
        assert name in scraped.helped and scraped.types.get(name) == kind, name
        assert name not in scraped.samples, f"{name} has samples without any alert rule"
    # And labelled families that did see events have their series.
    assert "movinet_input_lag_seconds" in scraped.samples
    assert "movinet_frames_deadlettered_total" in scraped.samples


def test_promtool_checks_a_live_scrape(scraped: Exposition, promtool: str) -> None:
    """Prometheus' own lint of the exposition: no gauge with a histogram's reserved suffix, etc."""
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=scraped.text, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"promtool check metrics:\n{proc.stdout}\n{proc.stderr}"


def test_every_labelled_counter_starts_at_zero_for_every_known_label(scraped: Exposition) -> None:
    from schemas.messages import REASONS

    for reason in REASONS:
        line = f'movinet_frames_deadlettered_total{{reason="{reason}"}} '
        assert line in scraped.text, f"no {line.strip()} series"


def test_every_metric_in_the_rules_is_exported_by_a_running_worker(scraped: Exposition) -> None:
    referenced = {n for r in rules() for n in metric_names(r["expr"]) if ":" not in n}
    assert referenced, "no metric names found in the rules"
    missing = sorted(n for n in referenced if not scraped.exports(n))
    assert not missing, f"rules.yml names metrics a running worker does not export: {missing}"


def test_every_metric_on_the_dashboard_is_exported_by_a_running_worker(scraped: Exposition) -> None:
    referenced = {n for e in dashboard_exprs(dashboard()) for n in metric_names(e) if ":" not in n}
    missing = sorted(n for n in referenced if not scraped.exports(n))
    assert not missing, f"the dashboard names metrics a running worker does not export: {missing}"
    shown = {n for n in referenced if n in scraped.types}
    shown |= {n.removesuffix(s) for n in referenced - shown for s in HISTOGRAM_SUFFIXES if n.endswith(s)}
    assert shown >= DASHBOARD_MUST_SHOW, f"not on the dashboard: {sorted(DASHBOARD_MUST_SHOW - shown)}"
