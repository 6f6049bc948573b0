"""The operations files: Prometheus alert rules (and their promtool unit
tests) and the Grafana dashboard, checked against the daemon's metrics
contract.  Needs no root and no BPF; the promtool tests are skipped only when
promtool is not installed (Debian package `prometheus`, see
deploy/setup-host.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ksbpf.json"

# The metrics contract of `ksbpf daemon` ([metrics] listen), name -> labels.
METRICS: dict[str, set[str]] = {
    "ksbpf_dropped_packets_total": {"scope", "reason", "family", "hook"},
    "ksbpf_dropped_bytes_total": {"scope", "reason", "family", "hook"},
    "ksbpf_allowed_packets_total": {"scope", "path"},
    "ksbpf_allowed_bytes_total": {"scope", "path"},
    "ksbpf_tunnel_up": {"scope", "tunnel"},
    "ksbpf_scope_attached": {"scope"},
    "ksbpf_netlink_events_total": {"type"},
    "ksbpf_route_alerts_total": set(),
    "ksbpf_guards_displaced_total": set(),
    "ksbpf_events_suppressed_total": {"scope"},
    "ksbpf_build_info": {"version"},
    "ksbpf_verify_failures": {"scope", "check"},
    "ksbpf_verify_runs_total": set(),
    "ksbpf_verify_last_success_timestamp_seconds": set(),
    "up": {"job"},  # Prometheus' own, for the scrape target (job "ksbpf")
}
TARGET_LABELS = {"job", "instance"}  # added by the scrape

REQUIRED_ALERTS = {
    "KsbpfTunnelDown",
    "KsbpfDropSpike",
    "KsbpfRouteAlert",
    "KsbpfDaemonAbsent",
    "KsbpfScopeDetached",
    "KsbpfVerifyFailed",
}

# Words of PromQL that are not metric names.
PROMQL_WORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset",
    # functions used on counters and gauges
    "rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes", "absent",
    "absent_over_time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "present_over_time", "clamp_min", "clamp_max",
    "histogram_quantile", "label_replace", "label_join", "vector", "scalar", "time",
    "round", "ceil", "floor", "abs", "sort", "sort_desc", "timestamp",
}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$scope": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; "
                    "`make setup` installs it)")
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ PromQL helpers

def without_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every vector selector in expr."""
    strings: list[str] = []

    def hide(m: re.Match) -> str:
        strings.append(m.group(0))
        return f'"{len(strings) - 1}"'

    expr = re.sub(r'"(?:[^"\\]|\\.)*"', hide, expr)
    # grouping clauses name labels, not metrics
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)            # range selectors
    expr = re.sub(r"\$\{?\w+\}?", "", expr)           # template variables
    expr = re.sub(r"(?<![\w:\"])\d[\w.]*", "", expr)    # numbers, durations (offset 5m)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*(\{[^}]*\})?", expr):
        name, matchers = m.group(1), m.group(2) or ""
        if not name and not matchers:
            continue
        if name in PROMQL_WORDS:
            # a function or keyword; what follows is a "(", never a "{"
            assert not matchers, f"{name}{matchers} in {expr!r}"
            continue
        matchers = re.sub(r'"(\d+)"', lambda s: strings[int(s.group(1))], matchers)
        found.append((name or "", matchers))
    return found


def matcher_labels(matchers: str) -> set[str]:
    return set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))


def check_expr(expr: str) -> list[str]:
    """Problems of one PromQL expression against the metrics contract."""
    problems = []
    sels = selectors(expr)
    if not sels:
        problems.append(f"no metric in {expr!r}")
    for name, matchers in sels:
        if name not in METRICS:
            problems.append(f"unknown metric {name or matchers!r} in {expr!r}")
            continue
        unknown = matcher_labels(matchers) - METRICS[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{name} has no label {sorted(unknown)} in {expr!r}")
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", without_strings(expr)):
        for label in (x.strip() for x in labels.split(",") if x.strip()):
            if not any(label in METRICS[n] | TARGET_LABELS for n, _ in sels if n in METRICS):
                problems.append(f"no metric of {expr!r} has the label {label!r}")
    return problems


def test_promql_helpers_see_metric_names():
    assert check_expr('sum by (reason) (rate(ksbpf_dropped_packets_total{scope=~"$scope"}[5m]))') == []
    assert check_expr('up{job="ksbpf"} == 0 or absent(up{job="ksbpf"})') == []
    assert check_expr("ksbpf_route_alerts_total offset 5m > 1e3") == []
    assert check_expr('rate(ksbpf_drop_packets_total{scope="rate"}[5m])')  # a typo
    assert check_expr("node_network_up")                                     # not ours
    assert check_expr('sum by (path) (rate(ksbpf_dropped_packets_total[1m]))')  # wrong label
    assert check_expr('ksbpf_tunnel_up{interface="wg0"}')                    # wrong label


# ------------------------------------------------------------------ alert rules

def alert_blocks() -> dict[str, str]:
    """alert name -> the text of its rule (alerts.yml is plain block YAML:
    one `- alert:` item per rule)."""
    blocks: dict[str, str] = {}
    lines = ALERTS.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)- alert:\s*(\S+)\s*$", line)
        if not m:
            continue
        indent = len(m.group(1))
        body = [line]
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        assert m.group(2) not in blocks, f"alert {m.group(2)} defined twice"
        blocks[m.group(2)] = "\n".join(body)
    return blocks


def section(block: str, key: str) -> str:
    """The lines nested under `key:` in an alert's block."""
    lines = block.splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"^(\s*){key}:\s*$", line)
        if m:
            indent = len(m.group(1))
            out = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                out.append(nxt)
            return "\n".join(out)
    return ""


def test_alert_rules_are_valid():
    r = run([promtool(), "check", "rules", "--lint=all", "--lint-fatal", str(ALERTS)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in r.stdout, r.stdout


def test_alert_rules_unit_tests_pass():
    r = run([promtool(), "test", "rules", ALERTS_TEST.name], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_every_alert_has_severity_summary_and_description():
    blocks = alert_blocks()
    assert set(blocks) == REQUIRED_ALERTS
    assert re.search(r"^\s*- name:\s*ksbpf\s*$", ALERTS.read_text(), re.M), "rule group ksbpf"
    for name, block in blocks.items():
        labels, annotations = section(block, "labels"), section(block, "annotations")
        assert re.search(r"^\s+severity:\s*(critical|warning|info)\s*$", labels, re.M), \
            f"{name}: labels.severity"
        for key in ("summary", "description"):
            m = re.search(rf"^\s+{key}:\s*(.*)$", annotations, re.M)
            assert m, f"{name}: annotations.{key}"
            text = m.group(1).strip()
            if text in (">-", ">", "|", "|-"):  # a block scalar: the text is on the next lines
                rest = annotations[m.end():].splitlines()
                text = next((x.strip() for x in rest if x.strip()), "")
            assert len(text) > 10, f"{name}: annotations.{key} is empty"


def test_alert_expressions_use_the_metrics_contract():
    for name, block in alert_blocks().items():
        m = re.search(r"^\s+expr:\s*(.+)$", block, re.M)
        assert m, f"{name}: expr"
        assert check_expr(m.group(1)) == [], name


def test_every_alert_is_tested_firing_and_not_firing():
    text = ALERTS_TEST.read_text()
    fires, quiet = set(), set()
    for m in re.finditer(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*(\S*)", text):
        (quiet if m.group(2) == "[]" else fires).add(m.group(1))
    assert fires >= REQUIRED_ALERTS, REQUIRED_ALERTS - fires
    assert quiet >= REQUIRED_ALERTS, REQUIRED_ALERTS - quiet


# ------------------------------------------------------------------ dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def test_dashboard_structure():
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    scope = variables["scope"]
    assert scope["type"] == "query"
    query = scope["query"]["query"] if isinstance(scope["query"], dict) else scope["query"]
    assert re.sub(r"\s", "", query) == "label_values(ksbpf_scope_attached,scope)"
    assert scope["datasource"]["uid"] == "${DS_PROMETHEUS}"

    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels():
        if p["type"] == "row":
            continue
        assert exprs(p), f"panel {p['title']!r} has a query"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == "${DS_PROMETHEUS}", p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_dashboard_queries_use_the_metrics_contract():
    problems = []
    for p in panels():
        for expr in exprs(p):
            problems += [f"{p['title']}: {x}" for x in check_expr(expr)]
            # every per-scope metric follows the scope selector
            for name, matchers in selectors(expr):
                if "scope" in METRICS.get(name, set()):
                    if 'scope=~"$scope"' not in matchers.replace(" ", ""):
                        problems.append(f"{p['title']}: {name} not filtered by $scope")
    assert problems == []


def test_dashboard_queries_parse():
    """Every panel query, with Grafana's variables filled in, is valid PromQL
    (promtool checks them as recording rules)."""
    rules = []
    for p in panels():
        for i, expr in enumerate(exprs(p)):
            for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:panel{p['id']}:{i}", "expr": expr})
    assert rules
    tool = promtool()
    # JSON is YAML: no YAML library needed.
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        r = run([tool, "check", "rules", f.name], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_has_the_required_panels():
    def find(metric: str, *, by: str | None = None, types: tuple[str, ...] = ("timeseries",),
             stacked: bool = False) -> list[dict]:
        hits = []
        for p in panels():
            if p["type"] not in types:
                continue
            for expr in exprs(p):
                if metric not in [n for n, _ in selectors(expr)]:
                    continue
                if by and not re.search(rf"\bby\s*\(\s*{by}\s*\)", expr):
                    continue
                if stacked and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] != "normal":
                    continue
                hits.append(p)
        return hits

    def uses_rate(panel_list: list[dict]) -> bool:
        return any(re.search(r"\b(rate|irate)\(", e) for p in panel_list for e in exprs(p))

    topics = {
        "drops by reason over time (rate, stacked)":
            find("ksbpf_dropped_packets_total", by="reason", stacked=True),
        "drops by family": find("ksbpf_dropped_packets_total", by="family"),
        "tunnel state": find("ksbpf_tunnel_up", types=("state-timeline", "stat")),
        "allowed packets by path": find("ksbpf_allowed_packets_total", by="path"),
        "allowed bytes by path": find("ksbpf_allowed_bytes_total", by="path"),
        "route alerts": find("ksbpf_route_alerts_total", types=("timeseries", "stat")),
        "events suppressed": find("ksbpf_events_suppressed_total"),
        "scope attached": find("ksbpf_scope_attached", types=("stat", "state-timeline", "table")),
    }
    missing = [topic for topic, hits in topics.items() if not hits]
    assert missing == [], f"no panel for: {missing}"
    for topic in ("drops by reason over time (rate, stacked)", "drops by family",
                  "allowed packets by path", "allowed bytes by path", "events suppressed"):
        assert uses_rate(topics[topic]), f"{topic}: a rate()"
