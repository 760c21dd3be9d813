#!/usr/bin/env python3
"""A real Prometheus server scrapes a local cluster (coordinator + 2 expert workers) while
requests run; then

  * every PromQL expression of the Grafana dashboard is evaluated through Prometheus' HTTP API
    and must return data;
  * the dashboard uses only metric names that /metrics actually exports;
  * sum(moe_expert_tokens_total) = (prompt + generated - finished requests) x top_k x layers
    exactly, with prompt and generated counted by the client; the "- finished requests" is the
    last token of each request, which is sampled but never run through the model;
  * per (layer, expert) the workers' moe_worker_rows_total add up to the coordinator's
    moe_expert_tokens_total, and each worker's rows equal the coordinator's
    moe_dispatch_rows_total for it — both in the raw scrapes and through PromQL.

Usage: prometheus_test.py --bin-dir build/bin   (run from the repository root)
Needs the `prometheus` binary (Debian package prometheus; scripts/install_deps.sh installs it).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "deploy"), str(ROOT / "tests" / "pyutil")]
from dashboard_test import dashboard_exprs  # noqa: E402
from servers import ServerProcess, free_port  # noqa: E402

MODEL = ROOT / "tests" / "testdata" / "models" / "demo_mixtral"
DASHBOARD = ROOT / "deploy" / "grafana" / "moe-cluster.json"
BIN_DIR = None  # set from --bin-dir
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def scrape(address):
    """/metrics of HOST:PORT -> list of (name, {labels}, value)."""
    out = []
    for line in http_get(f"http://{address}/metrics").splitlines():
        m = SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        labels = dict(LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples, name, **match):
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == val for k, val in match.items()))


class PrometheusClusterTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moe_prom_")
        cls.procs = []
        try:
            cls._start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start(cls):
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise RuntimeError("the prometheus binary is not on PATH: run scripts/install_deps.sh "
                               "(Debian package prometheus)")
        env_bin = Path(BIN_DIR)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        workers = []
        for i, experts in enumerate(["0-3", "4-7"]):
            w = ServerProcess(f"worker{i}", [env_bin / "moe-expert-worker", "--model", MODEL,
                                             "--experts", experts, "--listen", "127.0.0.1:0",
                                             "--metrics-listen", "127.0.0.1:0", "--threads", "1"],
                              cls.tmp)
            cls.procs.append(w)
            w.wait_ready()
            workers.append(w)
        cls.workers = workers
        cls.coordinator = ServerProcess(
            "coordinator",
            [env_bin / "moe-coordinator", "--model", MODEL,
             "--workers", ",".join(w.announced["READY"] for w in workers),
             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"], cls.tmp)
        cls.procs.append(cls.coordinator)
        cls.coordinator.wait_ready()
        for p in cls.procs:
            assert "METRICS" in p.announced, f"{p.name} printed no METRICS line"

        port = free_port()
        cls.prom_url = f"http://127.0.0.1:{port}"
        config = Path(cls.tmp) / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "moe-coordinator",
                 "static_configs": [{"targets": [cls.coordinator.announced["METRICS"]]}]},
                {"job_name": "moe-worker",
                 "static_configs": [{"targets": [w.announced["METRICS"] for w in workers]}]},
            ]}))
        cls.prom_log = open(Path(cls.tmp) / "prometheus.log", "w")
        cls.prom = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={cls.tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=cls.prom_log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                if "Ready" in http_get(cls.prom_url + "/-/ready", timeout=2):
                    break
            except OSError:
                pass
            if cls.prom.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prometheus did not start; see {cls.prom_log.name}")
            time.sleep(0.2)
        # All three targets up before traffic, so the counters' zero is in the TSDB.
        cls.wait_for(lambda: len([r for r in cls.query("up == 1")]) == 3, "3 targets up")

        cls.client = cls.run_traffic()
        # Prometheus has the final values once its last scrape saw them.
        final = scrape(cls.coordinator.announced["METRICS"])
        want = total(final, "moe_generation_tokens_total")
        cls.wait_for(lambda: [float(r["value"][1]) for r in
                              cls.query("moe_generation_tokens_total")] == [want],
                     "Prometheus to scrape the final counts")
        time.sleep(2.5)  # a few more scrapes, so rate() windows see the idle tail too

    @classmethod
    def tearDownClass(cls):
        for p in getattr(cls, "procs", []):
            p.stop()  # (exit codes: the worker/coordinator tests check clean shutdown)
        prom = getattr(cls, "prom", None)
        if prom is not None and prom.poll() is None:
            prom.terminate()
            prom.wait(timeout=15)
        if getattr(cls, "prom_log", None):
            cls.prom_log.close()
        if os.environ.get("MOE_KEEP_LOGS"):
            print(f"logs kept in {cls.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def query(cls, promql):
        url = cls.prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(http_get(url))
        if body.get("status") != "success":
            raise AssertionError(f"{promql}: {body}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]

    @classmethod
    def wait_for(cls, predicate, what, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if predicate():
                    return
            except (OSError, AssertionError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")

    @classmethod
    def run_traffic(cls):
        """Three rounds of 4 concurrent requests (exact lengths), one invalid request. Returns
        the client-side totals: prompt, generated, finished requests."""
        cli = str(Path(BIN_DIR) / "moe-cli")
        server = cls.coordinator.announced["READY"]
        prompts = ["We hold these truths to be self-evident, that",
                   "Four score and seven years ago",
                   "Congress shall make no law respecting",
                   "When in the course of human events"]
        usage = re.compile(r"\[(\d+) prompt tokens, (\d+) generated")
        totals = {"prompt": 0, "generated": 0, "finished": 0}
        lock = threading.Lock()
        errors = []

        def one(prompt, max_tokens, seed):
            r = subprocess.run([cli, "generate", "--server", server, "--prompt", prompt,
                                "--max-tokens", str(max_tokens), "--ignore-eos",
                                "--temperature", "0.8", "--seed", str(seed)],
                               capture_output=True, text=True, timeout=120)
            m = usage.search(r.stderr + r.stdout)
            with lock:
                if r.returncode != 0 or not m:
                    errors.append(f"moe-cli rc {r.returncode}: {r.stderr[-500:]}")
                    return
                totals["prompt"] += int(m.group(1))
                totals["generated"] += int(m.group(2))
                totals["finished"] += 1

        for round_ in range(3):
            threads = [threading.Thread(target=one, args=(p, 16 + 8 * i, round_ * 10 + i))
                       for i, p in enumerate(prompts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(1.2)  # let Prometheus see the counters move between rounds
        if errors:
            raise AssertionError("\n".join(errors))
        bad = subprocess.run([cli, "generate", "--server", server, "--prompt", "x",
                              "--max-tokens", "0"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "max_tokens" in bad.stderr, bad.stderr
        return totals

    def test_expert_token_identity_against_client_counts(self):
        c = scrape(self.coordinator.announced["METRICS"])
        prompt, generated, finished = (self.client[k] for k in ("prompt", "generated",
                                                                "finished"))
        self.assertEqual(finished, 12)
        self.assertEqual(total(c, "moe_prompt_tokens_total"), prompt)
        self.assertEqual(total(c, "moe_generation_tokens_total"), generated)
        self.assertEqual(total(c, "moe_requests_total", outcome="length"), finished)
        self.assertEqual(total(c, "moe_requests_total", outcome="rejected"), 1)
        self.assertEqual(total(c, "moe_time_to_first_token_seconds_count"), finished)
        self.assertEqual(total(c, "moe_inter_token_latency_seconds_count"), generated - finished)
        config = json.loads((MODEL / "config.json").read_text())
        top_k, layers = config["num_experts_per_tok"], config["num_hidden_layers"]
        expected = (prompt + generated - finished) * top_k * layers
        self.assertEqual(total(c, "moe_expert_tokens_total"), expected)
        # The same through Prometheus.
        [r] = self.query("sum(moe_expert_tokens_total)")
        self.assertEqual(float(r["value"][1]), expected)
        [r] = self.query("sum(moe_prompt_tokens_total) + sum(moe_generation_tokens_total)"
                         " - sum(moe_requests_total{outcome=~\"stop|length\"})")
        self.assertEqual(float(r["value"][1]) * top_k * layers, expected)

    def test_worker_rows_agree_with_coordinator_counts(self):
        c = scrape(self.coordinator.announced["METRICS"])
        coordinator = {(l["layer"], l["expert"]): v for n, l, v in c
                       if n == "moe_expert_tokens_total"}
        self.assertGreater(sum(coordinator.values()), 0)
        workers = {}
        for w in self.workers:
            rows = [(l["layer"], l["expert"], v) for n, l, v in scrape(w.announced["METRICS"])
                    if n == "moe_worker_rows_total"]
            for layer, expert, v in rows:
                workers[(layer, expert)] = workers.get((layer, expert), 0) + v
            self.assertEqual(total(c, "moe_dispatch_rows_total", worker=w.announced["READY"]),
                             sum(v for _, _, v in rows), w.name)
            self.assertEqual(total(c, "moe_worker_up", worker=w.announced["READY"]), 1, w.name)
        self.assertEqual(workers, coordinator)
        # Through PromQL: no (layer, expert) where the two sides differ, all cells present.
        diff = self.query("sum by (layer, expert) (moe_worker_rows_total)"
                          " != sum by (layer, expert) (moe_expert_tokens_total)")
        self.assertEqual(diff, [])
        matched = self.query("sum by (layer, expert) (moe_worker_rows_total)"
                             " == sum by (layer, expert) (moe_expert_tokens_total)")
        self.assertEqual(len(matched), len(coordinator))

    def test_every_dashboard_expression_returns_data(self):
        exprs = dashboard_exprs(DASHBOARD)
        self.assertGreater(len(exprs), 10)
        empty = []
        for title, expr in exprs:
            result = self.query(expr)
            # Data: at least one series, and at least one number (a histogram_quantile over a
            # window without observations, or 0/0, would be NaN only).
            values = [float(r["value"][1]) for r in result]
            if not any(v == v for v in values):
                empty.append(f"{title}: {expr} -> {values}")
        self.assertEqual(empty, [], "dashboard expressions without data")

    def test_dashboard_uses_only_exported_metric_names(self):
        exported = {n for n, _, _ in scrape(self.coordinator.announced["METRICS"])}
        for w in self.workers:
            exported |= {n for n, _, _ in scrape(w.announced["METRICS"])}
        used = set()
        for _, expr in dashboard_exprs(DASHBOARD):
            used |= set(re.findall(r"\bmoe_[a-z_]+", expr))
        self.assertTrue(used)
        self.assertEqual(sorted(used - exported), [], "dashboard metrics missing from /metrics")
        # The names are all there.
        for name in ["moe_expert_tokens_total", "moe_layer_expert_imbalance_ratio",
                     "moe_requests_total", "moe_requests_running", "moe_requests_waiting",
                     "moe_prompt_tokens_total", "moe_generation_tokens_total",
                     "moe_time_to_first_token_seconds_bucket",
                     "moe_inter_token_latency_seconds_bucket",
                     "moe_request_duration_seconds_bucket", "moe_kv_cache_usage_ratio",
                     "moe_dispatch_duration_seconds_bucket", "moe_dispatch_bytes_total",
                     "moe_worker_up", "moe_worker_rows_total",
                     "moe_worker_forward_duration_seconds_bucket", "moe_build_info"]:
            self.assertIn(name, exported)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "build" / "bin"))
    args, rest = parser.parse_known_args()
    BIN_DIR = args.bin_dir
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
