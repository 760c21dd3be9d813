#!/usr/bin/env python3
"""Writes the Grafana dashboard deploy/grafana/moe-cluster.json and the Helm chart's copy
(deploy/helm/moe-cluster/dashboards/moe-cluster.json) from the panel list below.

    python3 tools/deploy/make_dashboard.py          # rewrite both files
    python3 tools/deploy/make_dashboard.py --check  # exit 1 if they differ from this script

The dashboard uses only the metric names of docs/metrics.md; tests/deploy/dashboard_test.py
checks its structure and tests/observability/prometheus_test.py evaluates every expression
against a real Prometheus scraping a local cluster. Stdlib only.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = [ROOT / "deploy" / "grafana" / "moe-cluster.json",
           ROOT / "deploy" / "helm" / "moe-cluster" / "dashboards" / "moe-cluster.json"]
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new lines."""

    def __init__(self):
        self.panels = []
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"type": "row", "title": title, "id": self.next_id, "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, kind, title, description, targets, w=12, h=8, unit=None, **extra):
        refs = "ABCDEFGH"
        panel = {
            "type": kind, "title": title, "description": description, "id": self.next_id,
            "datasource": DS, "gridPos": self._place(w, h),
            "targets": [dict({"datasource": DS, "refId": refs[i]}, **t)
                        for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {},
        }
        if unit:
            panel["fieldConfig"]["defaults"]["unit"] = unit
        for key, value in extra.items():
            if key == "defaults":
                panel["fieldConfig"]["defaults"].update(value)
            else:
                panel[key] = value
        self.next_id += 1
        self.panels.append(panel)


def t(expr, legend="", **extra):
    return dict({"expr": expr, "legendFormat": legend, "range": True, "instant": False}, **extra)


def instant(expr, legend="", fmt="time_series"):
    return {"expr": expr, "legendFormat": legend, "range": False, "instant": True, "format": fmt}


def quantiles(metric, by=""):
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [t(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RI}])))",
              f"{legend}p{int(q * 100)}") for q in (0.5, 0.99)]


def share(selector, by, total_by):
    """Share of routed tokens of each `by` group within its `total_by` group."""
    ignoring = ", ".join(sorted(set(by.split(", ")) - set(total_by.split(", ")) - {""}))
    total = f"sum by ({total_by}) " if total_by else "sum "
    return (f"sum by ({by}) (rate({selector}[{RI}])) / ignoring({ignoring}) group_left "
            f"{total}(rate({selector}[{RI}]))")


def build():
    L = Layout()
    L.row("Overview")
    stat = {"options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}
    L.panel("stat", "Generated tokens/s", "Tokens sampled per second over all requests.",
            [t(f"sum(rate(moe_generation_tokens_total[{RI}]))", "generated")], w=4, h=4,
            unit="short", **stat)
    L.panel("stat", "Prompt tokens/s", "Prompt tokens prefilled per second.",
            [t(f"sum(rate(moe_prompt_tokens_total[{RI}]))", "prompt")], w=4, h=4, unit="short",
            **stat)
    L.panel("stat", "Running requests", "Requests in the coordinator's running batch now.",
            [t("sum(moe_requests_running)", "running")], w=4, h=4, **stat)
    L.panel("stat", "Waiting requests", "Requests queued for admission (beyond --max-waiting "
            "new ones are rejected).", [t("sum(moe_requests_waiting)", "waiting")], w=4, h=4,
            **stat)
    L.panel("stat", "KV cache usage", "Fraction of the coordinator's KV cache blocks in use.",
            [t("max(moe_kv_cache_usage_ratio)", "used")], w=4, h=4, unit="percentunit",
            defaults={"min": 0, "max": 1}, **stat)
    L.panel("stat", "Workers down", "Expert workers the coordinator cannot reach now (0 when all "
            "are serving). Any worker down fails the requests that need its experts.",
            [t("count(moe_worker_up == 0) or vector(0)", "down")], w=4, h=4,
            defaults={"thresholds": {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": 1}]}},
            **dict(stat, options=dict(stat["options"], colorMode="background")))
    L.panel("timeseries", "Tokens/s", "Prompt tokens prefilled and tokens generated per second.",
            [t(f"sum(rate(moe_prompt_tokens_total[{RI}]))", "prompt"),
             t(f"sum(rate(moe_generation_tokens_total[{RI}]))", "generated")], unit="short")
    L.panel("timeseries", "Running and waiting requests", "Continuous batching: requests "
            "decoding together and requests queued behind them.",
            [t("sum(moe_requests_running)", "running"), t("sum(moe_requests_waiting)", "waiting")],
            unit="short")
    L.panel("timeseries", "Request outcomes", "Requests per second by how they ended: stop (EOS "
            "or stop string), length (max_tokens), cancelled (client went away), error (a worker "
            "failed, KV cache exhausted, shutdown), rejected (invalid or queue full).",
            [t(f"sum by (outcome) (rate(moe_requests_total[{RI}]))", "{{outcome}}")],
            unit="reqps")
    L.panel("timeseries", "KV cache usage", "Fraction of KV cache blocks in use. Near 1, new "
            "requests wait and long ones may fail with RESOURCE_EXHAUSTED.",
            [t("max(moe_kv_cache_usage_ratio)", "used")], unit="percentunit",
            defaults={"min": 0, "max": 1})

    L.row("Expert load")
    L.panel("table", "Expert load: share of routed tokens (layer x expert)",
            "Each cell: the fraction of a layer's routed tokens that went to an expert over the "
            "dashboard's time range (rows = layers, columns = experts; each row sums to 1). "
            "An even router gives 1/experts everywhere; a dark cell is a hot expert. Rendered as "
            "a table: an instant query, 'Grouping to matrix' turns (layer, expert, value) rows "
            "into a layer x expert grid, and the cells are colored by value — Grafana's heatmap "
            "panel draws time on the x axis and cannot show a layer x expert matrix.",
            [instant("sum by (layer, expert) (increase(moe_expert_tokens_total[$__range])) / "
                     "ignoring(expert) group_left sum by (layer) "
                     "(increase(moe_expert_tokens_total[$__range]))", fmt="table")],
            w=24, h=12, unit="percentunit",
            defaults={"min": 0, "decimals": 2, "color": {"mode": "continuous-BlPu"},
                      "custom": {"align": "center", "displayMode": "color-background",
                                 "cellOptions": {"type": "color-background"}}},
            options={"showHeader": True, "cellHeight": "sm"},
            transformations=[
                {"id": "convertFieldType", "options": {"conversions": [
                    {"targetField": "layer", "destinationType": "number"},
                    {"targetField": "expert", "destinationType": "number"}]}},
                {"id": "groupingToMatrix", "options": {"columnField": "expert",
                                                       "rowField": "layer",
                                                       "valueField": "Value"}},
                {"id": "sortBy", "options": {"sort": [{"field": "layer\\expert"}]}}])
    L.panel("timeseries", "Imbalance per layer (max / mean tokens per expert, 60 s)",
            "moe_layer_expert_imbalance_ratio: 1 = every expert of the layer got the same number "
            "of tokens in the last 60 s; E (the expert count) = one expert got all of them. The "
            "thick line is the worst layer.",
            [t("moe_layer_expert_imbalance_ratio", "layer {{layer}}"),
             t("max(moe_layer_expert_imbalance_ratio)", "max over layers")],
            fieldConfig={"defaults": {"unit": "short", "min": 0}, "overrides": [
                {"matcher": {"id": "byName", "options": "max over layers"},
                 "properties": [{"id": "custom.lineWidth", "value": 3}]}]})
    L.panel("bargauge", "Layer $layer: tokens per expert (time range)",
            "Tokens the router sent to each expert of the selected layer over the time range "
            "(the layer variable above picks the layer).",
            [instant("sum by (expert) (increase(moe_expert_tokens_total{layer=\"$layer\"}"
                     "[$__range]))", "expert {{expert}}")], unit="short",
            options={"orientation": "horizontal", "displayMode": "gradient",
                     "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
    L.panel("heatmap", "Layer $layer: expert share over time",
            "Each row is an expert of the selected layer, each column a time bucket, the color "
            "the expert's share of the layer's routed tokens.",
            [t(share('moe_expert_tokens_total{layer="$layer"}', "expert", ""), "{{expert}}",
               format="heatmap")],
            unit="percentunit",
            options={"calculate": False, "yAxis": {"axisPlacement": "left"},
                     "rowsFrame": {"layout": "auto"}, "color": {"mode": "scheme",
                                                               "scheme": "BlPu", "steps": 64},
                     "cellGap": 1, "legend": {"show": True}, "tooltip": {"show": True}})
    L.panel("timeseries", "Layer $layer: expert share and imbalance",
            "Share of the selected layer's routed tokens per expert, and that layer's imbalance "
            "ratio (right axis).",
            [t(share('moe_expert_tokens_total{layer="$layer"}', "expert", ""),
               "expert {{expert}}"),
             t('moe_layer_expert_imbalance_ratio{layer="$layer"}', "imbalance")],
            unit="percentunit",
            fieldConfig={"defaults": {"unit": "percentunit", "min": 0}, "overrides": [
                {"matcher": {"id": "byName", "options": "imbalance"},
                 "properties": [{"id": "unit", "value": "short"},
                                {"id": "custom.axisPlacement", "value": "right"}]}]})

    L.row("Latency")
    L.panel("timeseries", "Time to first token p50 / p99", "Arrival to first token, queueing "
            "and prefill included.", quantiles("moe_time_to_first_token_seconds"), w=8, unit="s")
    L.panel("timeseries", "Inter-token latency p50 / p99", "Time between consecutive tokens of a "
            "request (one decode step of the running batch).",
            quantiles("moe_inter_token_latency_seconds"), w=8, unit="s")
    L.panel("timeseries", "Request duration p50 / p99", "Arrival to end, every outcome but "
            "rejected.", quantiles("moe_request_duration_seconds"), w=8, unit="s")
    L.panel("timeseries", "Dispatch latency p99 per worker", "One layer's expert exchange with "
            "each worker, request written to answer read (network + the worker's compute). The "
            "slowest worker bounds every layer of every step.",
            [t(f"histogram_quantile(0.99, sum by (le, worker) "
               f"(rate(moe_dispatch_duration_seconds_bucket[{RI}])))", "{{worker}}")], unit="s")
    L.panel("timeseries", "Worker forward p99 (worker side)", "The worker's own time to check "
            "and compute one Forward message; the rest of the dispatch latency is transport.",
            [t(f"histogram_quantile(0.99, sum by (le, instance) "
               f"(rate(moe_worker_forward_duration_seconds_bucket[{RI}])))", "{{instance}}")],
            unit="s")

    L.row("Workers")
    L.panel("timeseries", "Load share per worker", "Fraction of all token-to-expert assignments "
            "sent to each worker. With a contiguous placement an even router gives each worker "
            "its fraction of the experts.",
            [t(share("moe_dispatch_rows_total", "worker", ""), "{{worker}}")],
            unit="percentunit", defaults={"min": 0})
    L.panel("timeseries", "Worker imbalance (max / mean load across workers)",
            "1 = every worker gets the same number of token-to-expert assignments; higher = the "
            "busiest worker is the bottleneck of every step.",
            [t(f"max(sum by (worker) (rate(moe_dispatch_rows_total[{RI}]))) / "
               f"avg(sum by (worker) (rate(moe_dispatch_rows_total[{RI}])))", "imbalance"),
             t(f"sum(rate(moe_dispatch_busiest_worker_rows_total[{RI}])) / "
               f"(sum(rate(moe_dispatch_rows_total[{RI}])) / count(moe_worker_up))",
               "per step (what rebalancing lowers)")],
            unit="short", defaults={"min": 0})
    L.panel("timeseries", "Dispatch bytes/s per worker", "Serialized Forward traffic between the "
            "coordinator and each worker, sent and received.",
            [t(f"sum by (worker, direction) (rate(moe_dispatch_bytes_total[{RI}]))",
               "{{worker}} {{direction}}")], unit="Bps")
    L.panel("state-timeline", "Worker up / down", "Per worker: green while the coordinator is "
            "connected to it, red while it is unreachable (the coordinator reconnects by itself).",
            [t("moe_worker_up", "{{worker}}")],
            defaults={"mappings": [{"type": "value", "options": {
                "0": {"text": "down", "color": "red", "index": 1},
                "1": {"text": "up", "color": "green", "index": 0}}}],
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [
                    {"color": "red", "value": None}, {"color": "green", "value": 1}]}},
            options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.9})
    L.panel("timeseries", "Rows/s computed per worker (worker side)", "moe_worker_rows_total as "
            "each worker counts it; equals the coordinator's dispatch rows per worker.",
            [t(f"sum by (instance) (rate(moe_worker_rows_total[{RI}]))", "{{instance}}")],
            unit="short")
    L.panel("table", "Builds", "Version and git revision of every process.",
            [instant("moe_build_info", fmt="table")],
            transformations=[{"id": "organize", "options": {"excludeByName": {
                "Time": True, "Value": True, "__name__": True}}}])

    layer_var = {
        "name": "layer", "label": "layer", "type": "query", "datasource": DS,
        "query": {"query": "label_values(moe_expert_tokens_total, layer)", "refId": "layer"},
        "definition": "label_values(moe_expert_tokens_total, layer)", "refresh": 2, "sort": 3,
        "includeAll": False, "multi": False, "current": {}, "options": [], "hide": 0,
    }
    ds_var = {"name": "datasource", "label": "Prometheus", "type": "datasource",
              "query": "prometheus", "current": {}, "options": [], "hide": 0, "refresh": 1,
              "regex": ""}
    return {
        "__inputs": [],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.4.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "id": None, "uid": "moe-cluster", "title": "moe-cluster", "tags": ["moe-cluster"],
        "description": "Expert-parallel MoE inference: expert load per layer and expert, "
                       "throughput, latency, KV cache, workers. Metrics: docs/metrics.md.",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 38,
        "time": {"from": "now-15m", "to": "now"}, "timepicker": {}, "timezone": "",
        "version": 1, "links": [], "annotations": {"list": []},
        "templating": {"list": [ds_var, layer_var]},
        "panels": L.panels,
    }


def render():
    return json.dumps(build(), indent=2) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed files differ from what this writes")
    args = parser.parse_args()
    text = render()
    stale = [p for p in OUTPUTS if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is not what tools/deploy/make_dashboard.py writes; "
                  "run it", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
