#!/usr/bin/env python3
"""Static checks of the Grafana dashboard deploy/grafana/moe-cluster.json (stdlib only):
it is what tools/deploy/make_dashboard.py writes, the chart carries the same file, the
datasource is a variable everywhere, the layer variable exists, every target has an expression,
panels do not overlap, only the metric names of docs/metrics.md are used, and every panel the
issue asks for is there. tests/observability/prometheus_test.py evaluates the expressions
against a live Prometheus (it imports dashboard_exprs from here).

    python3 tests/deploy/dashboard_test.py
"""
import copy
import json
import re
import subprocess
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "moe-cluster.json"
CHART_COPY = ROOT / "deploy" / "helm" / "moe-cluster" / "dashboards" / "moe-cluster.json"

# docs/metrics.md: what the binaries export.
EXPORTED = {
    "moe_build_info", "moe_expert_tokens_total", "moe_layer_expert_imbalance_ratio",
    "moe_requests_total", "moe_requests_running", "moe_requests_waiting",
    "moe_prompt_tokens_total", "moe_generation_tokens_total", "moe_preemptions_total",
    "moe_degraded_tokens_total",
    "moe_time_to_first_token_seconds", "moe_inter_token_latency_seconds",
    "moe_request_duration_seconds", "moe_kv_cache_usage_ratio", "moe_dispatch_duration_seconds",
    "moe_dispatch_bytes_total", "moe_dispatch_rows_total", "moe_dispatch_busiest_worker_rows_total",
    "moe_worker_up",
    "moe_worker_rows_total", "moe_worker_forward_duration_seconds",
}
HISTOGRAMS = {"moe_time_to_first_token_seconds", "moe_inter_token_latency_seconds",
              "moe_request_duration_seconds", "moe_dispatch_duration_seconds",
              "moe_worker_forward_duration_seconds"}
# Grafana variables -> values that make the expression evaluable by Prometheus itself.
SUBSTITUTIONS = [("$__rate_interval", "1m"), ("$__range", "5m"), ("$__interval", "15s"),
                 ("${layer}", "0"), ("$layer", "0")]


def all_panels(dashboard):
    """Every panel, including those nested in rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def substitute(expr):
    for var, value in SUBSTITUTIONS:
        expr = expr.replace(var, value)
    return expr


def dashboard_exprs(path=DASHBOARD):
    """[(panel title, expression with Grafana variables substituted)] of every target."""
    dashboard = json.loads(Path(path).read_text())
    return [(p["title"], substitute(t["expr"])) for p in all_panels(dashboard)
            for t in p.get("targets", [])]


def metric_names(expr):
    """Metric names in an expression, histogram suffixes stripped."""
    names = set()
    for name in re.findall(r"\bmoe_[a-z_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def problems(dashboard):
    """Everything wrong with a dashboard, as messages (empty when it is fine)."""
    out = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        out.append("no datasource variable of type datasource for prometheus")
    layer = variables.get("layer")
    if not layer or "moe_expert_tokens_total" not in json.dumps(layer.get("query")):
        out.append("no layer variable over moe_expert_tokens_total")

    def walk(node, where):
        if isinstance(node, dict):
            if "datasource" in node and node["datasource"] != {"type": "prometheus",
                                                               "uid": "${datasource}"}:
                if where != "templating.datasource":
                    out.append(f"{where}: datasource {node['datasource']} is not ${{datasource}}")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
    walk(dashboard.get("panels", []), "panels")
    walk(dashboard.get("templating", {}), "templating")

    ids, boxes = set(), []
    for p in all_panels(dashboard):
        if p.get("id") in ids:
            out.append(f"duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        refs = set()
        for t in p.get("targets", []):
            if not t.get("expr", "").strip():
                out.append(f"{p['title']}: a target without expr")
            if not t.get("refId") or t.get("refId") in refs:
                out.append(f"{p['title']}: missing or repeated refId")
            refs.add(t.get("refId"))
            unknown = metric_names(t.get("expr", "")) - EXPORTED
            if unknown:
                out.append(f"{p['title']}: unknown metrics {sorted(unknown)}")
            leftover = re.findall(r"\$\{?\w+", substitute(t.get("expr", "")))
            if leftover:
                out.append(f"{p['title']}: variables Prometheus cannot evaluate: {leftover}")
        if p["type"] != "row" and not p.get("targets"):
            out.append(f"{p['title']}: no targets")
        if p["type"] != "row" and not p.get("description"):
            out.append(f"{p['title']}: no description")
    for p in dashboard.get("panels", []):
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            out.append(f"{p['title']}: outside the 24-column grid")
        for title, h in boxes:
            if (g["x"] < h["x"] + h["w"] and h["x"] < g["x"] + g["w"] and
                    g["y"] < h["y"] + h["h"] and h["y"] < g["y"] + g["h"]):
                out.append(f"{p['title']} overlaps {title}")
        boxes.append((p["title"], g))
    return out


REQUIRED = {  # what the issue asks for -> (panel type or None, a fragment of one expression)
    "layer x expert heatmap": ("table", "group_left sum by (layer)"),
    "per-layer view": (None, 'layer="$layer"'),
    "per-layer imbalance": (None, 'moe_layer_expert_imbalance_ratio{layer="$layer"}'),
    "imbalance across layers": (None, "max(moe_layer_expert_imbalance_ratio)"),
    "per-worker load share": (None, "sum by (worker) (rate(moe_dispatch_rows_total"),
    "per-worker imbalance": (None, "max(sum by (worker) (rate(moe_dispatch_rows_total"),
    "prompt tokens/s": (None, "rate(moe_prompt_tokens_total"),
    "generated tokens/s": (None, "rate(moe_generation_tokens_total"),
    "TTFT p50": (None, "histogram_quantile(0.5, sum by (le) (rate(moe_time_to_first_token"),
    "TTFT p99": (None, "histogram_quantile(0.99, sum by (le) (rate(moe_time_to_first_token"),
    "ITL p50": (None, "histogram_quantile(0.5, sum by (le) (rate(moe_inter_token_latency"),
    "ITL p99": (None, "histogram_quantile(0.99, sum by (le) (rate(moe_inter_token_latency"),
    "running": (None, "moe_requests_running"),
    "waiting": (None, "moe_requests_waiting"),
    "KV cache": (None, "moe_kv_cache_usage_ratio"),
    "dispatch p99 per worker": (None, "histogram_quantile(0.99, sum by (le, worker) "
                                      "(rate(moe_dispatch_duration_seconds_bucket"),
    "dispatch bytes/s per worker": (None, "rate(moe_dispatch_bytes_total"),
    "worker up/down": ("state-timeline", "moe_worker_up"),
    "request outcomes": (None, "sum by (outcome) (rate(moe_requests_total"),
}


def missing_required(dashboard):
    found = [(p["type"], t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]
    return [what for what, (kind, fragment) in REQUIRED.items()
            if not any(fragment in expr and (kind is None or kind == k) for k, expr in found)]


class DashboardTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = DASHBOARD.read_text()
        cls.dashboard = json.loads(cls.text)

    def test_generated_and_copied_into_the_chart(self):
        check = subprocess.run([sys.executable, str(ROOT / "tools/deploy/make_dashboard.py"),
                                "--check"], capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertEqual(CHART_COPY.read_text(), self.text)

    def test_importable_shape(self):
        d = self.dashboard
        self.assertIsNone(d["id"])
        self.assertEqual(d["uid"], "moe-cluster")
        self.assertEqual(d["title"], "moe-cluster")
        self.assertIn("moe-cluster", d["tags"])
        self.assertTrue(36 <= d["schemaVersion"] <= 39)

    def test_no_problems(self):
        self.assertEqual(problems(self.dashboard), [])

    def test_every_required_panel_is_there(self):
        self.assertEqual(missing_required(self.dashboard), [])

    def test_expressions_substitute_to_plain_promql(self):
        exprs = dashboard_exprs()
        self.assertGreaterEqual(len(exprs), 25)
        for title, expr in exprs:
            self.assertNotIn("$", expr, title)

    def test_the_checks_catch_broken_dashboards(self):
        def broken(mutate):
            d = copy.deepcopy(self.dashboard)
            mutate(d)
            return d
        panels = [p for p in self.dashboard["panels"] if p["type"] != "row"]
        first, second = (self.dashboard["panels"].index(p) for p in panels[:2])

        def set_uid(d):
            d["panels"][first]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "abc"}

        def rename_metric(d):
            d["panels"][first]["targets"][0]["expr"] = "rate(moe_tokens_total[1m])"

        def overlap(d):
            d["panels"][second]["gridPos"] = dict(d["panels"][first]["gridPos"])

        def drop_layer(d):
            d["templating"]["list"] = [v for v in d["templating"]["list"] if v["name"] != "layer"]

        def unknown_var(d):
            d["panels"][first]["targets"][0]["expr"] = "rate(moe_prompt_tokens_total[$window])"

        def repeat_id(d):
            d["panels"][second]["id"] = d["panels"][first]["id"]

        for mutate in (set_uid, rename_metric, overlap, drop_layer, unknown_var, repeat_id):
            self.assertNotEqual(problems(broken(mutate)), [], mutate.__name__)

        def drop_worker_up(d):
            for p in all_panels(d):
                p["targets"] = [t for t in p.get("targets", []) if "moe_worker_up" not in t["expr"]]
        self.assertIn("worker up/down", missing_required(broken(drop_worker_up)))


if __name__ == "__main__":
    unittest.main(verbosity=2)
