"""deploy/ observability files: the Prometheus config and rules, the Grafana dashboard and its
provisioning. Checked statically (structure, PromQL sanity, panel layout) and against a real
gateway process: every llmrelay_* name used in a rule or a panel must be a series that
/metrics exposes. promtool (Debian's, which tests/run unpacks into .venv/tools) checks both files too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import KEY, ROOT, GatewayProcess, module_gateway
from tests.mock_upstream import MockUpstream

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "llmrelay-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "llmrelay-dashboard.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards.yml"
COMPOSE = DEPLOY / "compose.yaml"

AUTH = {"Authorization": f"Bearer {KEY}"}
DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__range_ms"}
# sample-name suffixes that the text exposition derives from a histogram family
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# -- PromQL text helpers ------------------------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
METRIC = re.compile(r"(?<![\w:])llmrelay_[A-Za-z0-9_]*")
RECORDED = re.compile(r"(?<![\w:])llmrelay:[A-Za-z0-9_:]*")
DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
RANGE = re.compile(rf"\[\s*(?:{DURATION}|\$\{{?__\w+\}}?)\s*(?::\s*(?:{DURATION})?\s*)?\]\s*(?:offset\s+-?{DURATION})?$")
MATCHER = re.compile(r'^\s*[A-Za-z_]\w*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*$')
# functions whose (last) argument must be a range vector
RANGE_FUNCTIONS = ("rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes",
                   "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
                   "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
                   "present_over_time", "absent_over_time")
RANGE_CALL = re.compile(rf"(?<![\w:])({'|'.join(RANGE_FUNCTIONS)})\s*\(")
QUANTILE_CALL = re.compile(r"(?<![\w:])histogram_quantile\s*\(")


def without_strings(expr: str) -> str:
    """`expr` with every quoted string blanked (same length, so offsets still line up)."""
    return STRING.sub(lambda m: '"' + " " * (len(m.group()) - 2) + '"', expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(without_strings(expr)))


def recorded_names(expr: str) -> set[str]:
    return set(RECORDED.findall(without_strings(expr)))


def closing(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at `open_at` (strings already blanked), or -1."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []
    for i in range(open_at, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")}]":
            if not stack or stack.pop() != c:
                return -1
            if not stack:
                return i
    return -1


def top_level_args(inner: str, original: str | None = None) -> list[str]:
    """`inner` (strings blanked) split at its top-level commas; the pieces are cut from
    `original` (the same text with its strings) when given."""
    source = inner if original is None else original
    args, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(source[start:i])
            start = i + 1
    args.append(source[start:])
    return [a.strip() for a in args]


def promql_problems(expr: str) -> list[str]:
    """What is visibly wrong with a PromQL expression, without a PromQL parser: empty text,
    unbalanced brackets, malformed label matchers, range functions without a range selector,
    histogram_quantile without `le` in its aggregation."""
    if not isinstance(expr, str) or not expr.strip():
        return ["empty expression"]
    text = without_strings(expr)
    problems = []
    stack: list[str] = []
    for c in text:
        if c in "({[":
            stack.append({"(": ")", "{": "}", "[": "]"}[c])
        elif c in ")}]" and (not stack or stack.pop() != c):
            problems.append(f"unbalanced {c!r}")
            break
    if stack:
        problems.append(f"unclosed brackets, expecting {''.join(reversed(stack))!r}")
    if problems:
        return problems
    for m in re.finditer(r"\{", text):
        end = closing(text, m.start())
        body = text[m.start() + 1:end]
        for matcher in top_level_args(body, expr[m.start() + 1:end]) if body.strip() else []:
            if matcher and not MATCHER.match(matcher):
                problems.append(f"bad label matcher {matcher!r}")
    for m in RANGE_CALL.finditer(text):
        open_at = m.end() - 1
        args = top_level_args(text[open_at + 1:closing(text, open_at)])
        if not RANGE.search(args[-1]):
            problems.append(f"{m.group(1)}() without a range selector like [5m]: {args[-1]!r}")
    for m in QUANTILE_CALL.finditer(text):
        open_at = m.end() - 1
        args = top_level_args(text[open_at + 1:closing(text, open_at)])
        groupings = re.findall(r"\bby\s*\(([^)]*)\)", args[-1])
        if len(args) != 2 or not any("le" in [g.strip() for g in grouping.split(",")] for grouping in groupings):
            problems.append("histogram_quantile() over an aggregation that drops `le`")
    return problems


def exposed_families(metrics_text: str) -> dict[str, set[str]]:
    """{family: its series names} from the `# TYPE` lines of /metrics (printed for a family even
    before it has a sample): counters as declared (`..._total`), histograms as _bucket/_sum/_count.
    The `_created` gauges are left out: they come only with a sample, and never in multiprocess mode."""
    families: dict[str, set[str]] = {}
    for line in metrics_text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[:2] == ["#", "TYPE"] and not parts[2].endswith("_created"):
            name, kind = parts[2], parts[3]
            if kind == "histogram":
                families[name] = {name + suffix for suffix in HISTOGRAM_SUFFIXES}
            elif kind == "summary":
                families[name] = {name, name + "_sum", name + "_count"}
            else:
                families[name] = {name}
    return families


def exposed_series(metrics_text: str) -> set[str]:
    return set().union(*exposed_families(metrics_text).values())


def unknown_metrics(exprs: Iterable[str], known: set[str]) -> dict[str, set[str]]:
    """{llmrelay_* name: the expressions using it} for every name that `known` lacks."""
    unknown: dict[str, set[str]] = {}
    for expr in exprs:
        for name in metric_names(expr) - known:
            unknown.setdefault(name, set()).add(expr)
    return unknown


# -- the files ------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules_file() -> dict[str, Any]:
    return load_yaml(RULES)


def all_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def flat_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Top-level panels plus those nested in collapsed rows."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return out


def dashboard_exprs(doc: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in flat_panels(doc["panels"]) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_problems(doc: Any) -> list[str]:
    """Where a document departs from the Prometheus rule-file format (the subset promtool checks
    that does not need a PromQL parser), plus our conventions: severity and summary/description."""
    problems: list[str] = []
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        return ["top level must be {groups: [...]}"]
    group_names: set[str] = set()
    alerts: set[str] = set()
    for group in doc["groups"]:
        name = group.get("name")
        if not name or name in group_names:
            problems.append(f"group name missing or repeated: {name!r}")
        group_names.add(name)
        unknown = set(group) - {"name", "interval", "rules", "limit", "query_offset"}
        if unknown:
            problems.append(f"group {name}: unknown keys {unknown}")
        if not group.get("rules"):
            problems.append(f"group {name}: no rules")
        for rule in group.get("rules") or []:
            where = f"group {name}, rule {rule.get('record') or rule.get('alert')!r}"
            if ("record" in rule) == ("alert" in rule):
                problems.append(f"{where}: needs exactly one of record and alert")
                continue
            problems.extend(f"{where}: {p}" for p in promql_problems(rule.get("expr", "")))
            if "record" in rule:
                if set(rule) - {"record", "expr", "labels"}:
                    problems.append(f"{where}: unknown keys {set(rule) - {'record', 'expr', 'labels'}}")
                if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["record"]) or ":" not in rule["record"]:
                    problems.append(f"{where}: record name must be level:metric:operation")
                continue
            allowed = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if set(rule) - allowed:
                problems.append(f"{where}: unknown keys {set(rule) - allowed}")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]) or rule["alert"] in alerts:
                problems.append(f"{where}: alert name invalid or repeated")
            alerts.add(rule["alert"])
            if not re.fullmatch(DURATION, str(rule.get("for", ""))):
                problems.append(f"{where}: `for` must be a duration like 5m")
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                problems.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}")
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description"):
                text = annotations.get(key)
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: annotation {key} missing")
                elif text.count("{{") != text.count("}}"):
                    problems.append(f"{where}: unbalanced template braces in {key}")
    return problems


def overlaps(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of panels whose gridPos rectangles intersect."""
    boxes = [(p.get("title", p.get("id")), p["gridPos"]) for p in panels]
    found = []
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1:]:
            if (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                    and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]):
                found.append((title_a, title_b))
    return found


# -- a real gateway ---------------------------------------------------------------------------

class Exposition:
    def __init__(self, before_traffic: str, after_traffic: str) -> None:
        self.before_traffic = before_traffic
        self.after_traffic = after_traffic
        self.series = exposed_series(after_traffic)


@pytest.fixture(scope="module")
def live(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposition]:
    """/metrics of a gateway before any request, and after a chat request, a stream and a log ingestion."""
    gateways = module_gateway(tmp_path_factory, "observability", mock_upstream)
    gw: GatewayProcess = next(gateways)
    before = httpx.get(f"{gw.url}/metrics").text
    messages = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as client:
        assert client.post("/api/chat/completions", json={"model": "gpt-test", "messages": messages}).status_code == 200
        # chunks 50 ms apart, so the stream has inter-chunk gaps to count whatever the client's reads join
        with client.stream("POST", "/api/chat/completions",
                           json={"model": "mock/mock-slow-3", "messages": messages, "stream": True}) as stream:
            assert stream.status_code == 200
            assert b"[DONE]" in b"".join(stream.iter_bytes())
        ingest = client.post("/api/request-logs/", json={"model": "gpt-test", "prompt_tokens": 1})
        assert ingest.status_code < 300, ingest.text
        after = client.get("/metrics").text
    yield Exposition(before, after)
    next(gateways, None)


# -- unit tests of the checkers themselves (so the checks below can fail) -------------------

def test_metric_check_catches_misspelled_and_bare_histogram_names():
    known = exposed_series("# HELP llmrelay_requests_total x\n# TYPE llmrelay_requests_total counter\n"
                           "# HELP llmrelay_request_latency_seconds x\n"
                           "# TYPE llmrelay_request_latency_seconds histogram\n")
    assert known == {"llmrelay_requests_total", "llmrelay_request_latency_seconds_bucket",
                     "llmrelay_request_latency_seconds_sum", "llmrelay_request_latency_seconds_count"}
    good = 'sum(rate(llmrelay_requests_total{status=~"5..", job="llmrelay_x"}[5m]))'
    assert unknown_metrics([good, "llmrelay:requests:rate5m > 1"], known) == {}
    typo = "sum(rate(llmrelay_request_total[5m]))"
    bare = "histogram_quantile(0.9, sum by (le) (rate(llmrelay_request_latency_seconds[5m])))"
    assert unknown_metrics([typo, bare], known) == {"llmrelay_request_total": {typo},
                                                    "llmrelay_request_latency_seconds": {bare}}


def test_promql_checker_catches_common_mistakes():
    assert promql_problems('sum by (model) (rate(llmrelay_requests_total{status=~"5.."}[5m])) > 0.1') == []
    assert promql_problems("histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket[$__rate_interval])))") == []
    assert promql_problems("max_over_time(x[10m:1m]) and rate(y[5m] offset 1h)") == []
    assert promql_problems("  ") == ["empty expression"]
    assert promql_problems("sum(rate(x[5m])") and promql_problems("sum(rate(x[5m])))")
    assert promql_problems('rate(x{a="(", b!~"]"}[5m])') == []  # brackets inside strings do not count
    assert any("range selector" in p for p in promql_problems("sum(rate(llmrelay_requests_total))"))
    assert any("range selector" in p for p in promql_problems("increase(x[5 m])"))
    assert any("label matcher" in p for p in promql_problems("x{status=5}"))
    assert any("le" in p for p in promql_problems("histogram_quantile(0.9, sum by (model) (rate(x_bucket[5m])))"))


def test_rule_checker_and_overlap_checker_can_fail():
    bad = {"groups": [{"name": "g", "rules": [
        {"record": "norecordcolon", "expr": "sum(x)"},
        {"alert": "A", "expr": "x > 1", "for": "soon", "labels": {}, "annotations": {"summary": "s"}},
        {"alert": "B", "record": "b:c", "expr": ""},
    ]}]}
    problems = "\n".join(rule_problems(bad))
    for expected in ("level:metric:operation", "`for`", "severity", "description", "exactly one"):
        assert expected in problems
    assert rule_problems({"groups": []}) == [] and rule_problems({"rules": []}) != []
    a = {"title": "a", "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8}}
    b = {"title": "b", "gridPos": {"x": 12, "y": 0, "w": 12, "h": 8}}
    c = {"title": "c", "gridPos": {"x": 6, "y": 7, "w": 4, "h": 2}}
    assert overlaps([a, b]) == [] and overlaps([a, b, c]) == [("a", "c")]


# -- Prometheus config and rules -------------------------------------------------------------

def test_prometheus_config_scrapes_llmrelay_and_loads_the_rules():
    config = load_yaml(PROMETHEUS)
    assert config["rule_files"] == ["llmrelay-rules.yml"]
    assert (PROMETHEUS.parent / config["rule_files"][0]).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["llmrelay"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert re.fullmatch(DURATION, job.get("scrape_interval", config["global"]["scrape_interval"]))
    # every replica, found by DNS (tests/test_deploy_files.py checks the names against compose)
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] and all(re.fullmatch(r"[\w.-]+", n) for n in sd["names"]) and sd["port"] > 0
    # the static example for a single gateway stays a comment, and stays valid YAML
    commented = "\n".join(line.split("#", 1)[1][1:] for line in PROMETHEUS.read_text().splitlines()
                          if line.lstrip().startswith("# ") and line.startswith("  #"))
    example = yaml.safe_load(commented[commented.index("- job_name: llmrelay"):])
    targets = [t for sc in example[0]["static_configs"] for t in sc["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)


def test_rules_file_has_the_prometheus_structure():
    doc = rules_file()
    assert rule_problems(doc) == []
    rules = all_rules(doc)
    assert any("record" in r for r in rules) and any("alert" in r for r in rules)


def test_alerts_use_only_recorded_series_that_exist():
    rules = all_rules(rules_file())
    recorded = [r["record"] for r in rules if "record" in r]
    assert len(recorded) == len(set(recorded))
    used = set().union(*(recorded_names(r["expr"]) for r in rules))
    assert used <= set(recorded), used - set(recorded)


def source_metrics(expr: str, recorded: dict[str, str]) -> set[str]:
    """The raw metric names behind `expr`, through the recording rules it uses."""
    names = metric_names(expr) | ({"up"} if re.search(r"(?<![\w:])up\b", without_strings(expr)) else set())
    for name in recorded_names(expr):
        names |= source_metrics(recorded[name], recorded)
    return names


@pytest.mark.parametrize(("metric", "severity"), [
    ("llmrelay_requests_total", "critical"),  # 5xx ratio per model/provider
    ("llmrelay_attempts_total", "warning"),
    ("llmrelay_fallbacks_total", "warning"),
    ("llmrelay_gateway_overhead_seconds_bucket", "warning"),
    ("llmrelay_log_records_spilled_total", "warning"),
    ("llmrelay_log_spool_errors_total", "critical"),  # logs at risk
    ("llmrelay_log_queue_depth", "warning"),
    ("llmrelay_limit_backend_errors_total", "critical"),
    ("llmrelay_alerts_failed_total", "warning"),
    ("llmrelay_deployment_cooling", "warning"),
    ("llmrelay_stream_chunk_gap_seconds_bucket", "warning"),
    ("llmrelay_cost_usd_total", "warning"),
    ("llmrelay_customer_cost_usd_total", "warning"),
    ("up", "critical"),
])
def test_an_alert_watches(metric, severity):
    rules = all_rules(rules_file())
    recorded = {r["record"]: r["expr"] for r in rules if "record" in r}
    severities = {r["labels"]["severity"] for r in rules
                  if "alert" in r and metric in source_metrics(r["expr"], recorded)}
    assert severity in severities, f"no {severity} alert on {metric} (found {severities})"


def test_recording_rules_cover_the_dashboard_basics():
    recorded = {r["record"]: r["expr"] for r in all_rules(rules_file()) if "record" in r}
    sources = {name: source_metrics(expr, recorded) for name, expr in recorded.items()}
    wanted = {
        "requests rate": ("llmrelay_requests_total", "rate("),
        "latency p50": ("llmrelay_request_latency_seconds_bucket", "0.5"),
        "latency p99": ("llmrelay_request_latency_seconds_bucket", "0.99"),
        "overhead p99": ("llmrelay_gateway_overhead_seconds_bucket", "0.99"),
        "ttft p95": ("llmrelay_time_to_first_token_seconds_bucket", "0.95"),
        "chunk gap p99": ("llmrelay_stream_chunk_gap_seconds_bucket", "0.99"),
        "cost by model": ("llmrelay_cost_usd_total", "by (model)"),
        "cost by customer": ("llmrelay_customer_cost_usd_total", "by (customer)"),
        "cache hit ratio": ("llmrelay_cache_lookups_total", 'result="hit"'),
    }
    for what, (metric, text) in wanted.items():
        assert any(metric in sources[n] and text in recorded[n] for n in recorded), what


def test_every_metric_in_the_rules_is_exposed_by_a_real_gateway(live):
    unknown = unknown_metrics((r["expr"] for r in all_rules(rules_file())), live.series)
    assert unknown == {}


PROMTOOL = ROOT / ".venv" / "tools" / "promtool"


def test_promtool_accepts_the_config_and_the_rules():
    promtool = shutil.which("promtool") or (str(PROMTOOL) if PROMTOOL.exists() else None)
    assert promtool, f"promtool not found on PATH or at {PROMTOOL}: run the suite with `bash tests/run`, which fetches it"
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


# -- the real exposition ----------------------------------------------------------------------

def test_families_are_declared_before_their_first_sample(live):
    # labelled collectors without a child yet (fallbacks, limits, chunk gaps) still print HELP/TYPE:
    # that is what lets the name checks run without exercising every feature
    assert "# TYPE llmrelay_fallbacks_total counter" in live.before_traffic
    assert "llmrelay_fallbacks_total{" not in live.before_traffic
    assert "# TYPE llmrelay_stream_chunk_gap_seconds histogram" in live.before_traffic
    assert exposed_series(live.before_traffic) == live.series
    assert "llmrelay_requests_total{" in live.after_traffic
    assert "llmrelay_stream_chunk_gap_seconds_bucket{" in live.after_traffic


def test_every_metric_in_the_dashboard_is_exposed_by_a_real_gateway(live):
    assert unknown_metrics(dashboard_exprs(dashboard()), live.series) == {}


def test_the_dashboard_shows_every_llmrelay_metric(live):
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard())))
    missing = {family for family, series in exposed_families(live.after_traffic).items()
               if family.startswith("llmrelay_") and not series & used}
    assert missing == set()


# -- Grafana ----------------------------------------------------------------------------------

def test_dashboard_datasource_and_variables():
    doc = dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    assert [i["name"] for i in doc["__inputs"] if i["pluginId"] == "prometheus"] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("model", "provider"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DS_REF
        assert var["query"]["query"].startswith("label_values(") and var["query"]["query"].endswith(f", {name})")
        assert var["includeAll"] and var["multi"]
    exprs = dashboard_exprs(doc)
    assert all(promql_problems(e) == [] for e in exprs), {e: promql_problems(e) for e in exprs if promql_problems(e)}
    used_vars = set().union(*(set(re.findall(r"\$\{?(\w+)", e)) for e in exprs))
    assert used_vars <= set(variables) | GRAFANA_BUILTINS, used_vars - set(variables) - GRAFANA_BUILTINS


def test_dashboard_panels_have_ids_titles_queries_and_a_layout():
    doc = dashboard()
    panels = flat_panels(doc["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in panels:
        pos = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(pos) and pos["w"] > 0 and pos["h"] > 0, p["title"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"].strip() and p.get("description", "").strip(), p["title"]
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == DS_REF, p["title"]
    assert overlaps(panels) == []
    # every panel sits under a row (rows partition the dashboard top to bottom)
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in doc["panels"] if p["type"] == "row")
    assert rows and rows[0][0] == 0
    titles = {title for _, title in rows}
    for wanted in ("Traffic", "Errors", "Latency", "Tokens and cost", "Cache", "Limits", "Logs pipeline"):
        assert wanted in titles


def test_dashboard_has_the_panels_the_issue_asks_for():
    exprs = dashboard_exprs(dashboard())

    def some(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    assert some("llmrelay_requests_total", "by (status)") and some("llmrelay_requests_total", "by (model")
    assert some('status=~"4..') and some('status=~"5..')
    for q in ("0.5", "0.9", "0.99"):
        assert some(f"histogram_quantile({q}", "llmrelay_request_latency_seconds_bucket")
    assert some("topk(", "llmrelay_customer_cost_usd_total")
    assert some("llmrelay_cost_usd_total", "by (model)", "3600")
    assert some("llmrelay_tokens_total", "kind", "model")
    assert some("llmrelay_limit_blocks_total", "scope", "metric")
    heatmaps = [p for p in flat_panels(dashboard()["panels"]) if p["type"] == "heatmap"]
    assert any("llmrelay_stream_chunk_gap_seconds_bucket" in t["expr"] and t.get("format") == "heatmap"
               for p in heatmaps for t in p["targets"])


def grafana_mount_problems(compose: dict[str, Any]) -> list[str]:
    """Where compose's grafana and prometheus services disagree with the provisioning files."""
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = {}
    for service in ("grafana", "prometheus"):
        for volume in compose["services"][service].get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[(DEPLOY / source).resolve()] = target
    problems = []
    dashboard_target = mounts.get(DASHBOARD.resolve(), "")
    if not any(dashboard_target.startswith(p["options"]["path"].rstrip("/") + "/") for p in providers):
        problems.append(f"dashboard mounted at {dashboard_target!r}, not in a provider's path")
    for path, folder in ((DATASOURCES, "datasources"), (DASHBOARD_PROVIDERS, "dashboards")):
        if not re.fullmatch(rf"/etc/grafana/provisioning/{folder}/[^/]+\.ya?ml", mounts.get(path.resolve(), "")):
            problems.append(f"{path.name} not mounted into /etc/grafana/provisioning/{folder}/")
    prometheus_dir = mounts.get(PROMETHEUS.resolve(), "/nowhere/x").rsplit("/", 1)[0]
    if mounts.get(RULES.resolve()) != f"{prometheus_dir}/{RULES.name}":
        problems.append("llmrelay-rules.yml not mounted next to prometheus.yml")
    return problems


def test_grafana_provisioning_files():
    datasources = load_yaml(DATASOURCES)
    assert datasources["apiVersion"] == 1
    prometheus = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["url"].startswith("http") and prometheus[0]["isDefault"]
    providers = load_yaml(DASHBOARD_PROVIDERS)
    assert providers["apiVersion"] == 1
    assert all(p["type"] == "file" and p["options"]["path"].startswith("/") for p in providers["providers"])
    # the mount check itself: a compose file that mounts nothing is refused
    bare = {"services": {"grafana": {"image": "grafana/grafana"}, "prometheus": {"image": "prom/prometheus"}}}
    assert len(grafana_mount_problems(bare)) == 4


def test_compose_mounts_the_provisioning_files():
    compose = load_yaml(COMPOSE)
    assert "grafana" in compose["services"] and "prometheus" in compose["services"]
    assert grafana_mount_problems(compose) == []
