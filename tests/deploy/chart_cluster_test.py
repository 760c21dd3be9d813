#!/usr/bin/env python3
"""Runs the containers' commands exactly as the Helm chart renders them, on loopback.

Renders deploy/helm/moe-cluster for a 3-expert tiny checkpoint over 2 workers, then starts each
worker through the rendered command (the ConfigMap's worker-entrypoint.sh reading the rendered
placement for its pod ordinal) and the coordinator with the rendered arguments, changing only
what a pod has and this machine has not: the model's mount path, the ConfigMap mount, the
binaries' directory, the listen addresses (127.0.0.1, port 0 or a free port), and each worker
DNS name, mapped to the address its worker printed. The cluster must form, serve moe-cli status
and generate and the OpenAI API, serve /metrics on the rendered metrics ports, and stop cleanly
on SIGTERM.

    build/venv-deploy/bin/python tests/deploy/chart_cluster_test.py --bin-dir build/bin
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import unittest
import urllib.request

import helm_python as helm
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pyutil"))
from servers import ServerProcess, free_port  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "moe-cluster"
MODEL = REPO / "tests" / "testdata" / "models" / "mixtral_3e_sliding_bf16"
NAMESPACE = "moe"
BIN_DIR = None  # --bin-dir
START_TIMEOUT_S = 60


def replace_flag(args, name, value):
    """args with --name=... replaced by --name=value (exactly one occurrence required)."""
    hits = [i for i, a in enumerate(args) if a.startswith(f"--{name}=")]
    assert len(hits) == 1, f"--{name} appears {len(hits)} times in {args}"
    return [f"--{name}={value}" if i == hits[0] else a for i, a in enumerate(args)]


class ChartClusterTest(unittest.TestCase):
    def setUp(self):
        self.assertIsNotNone(BIN_DIR, "run with --bin-dir build/bin")
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.processes = []

    def tearDown(self):
        for process in reversed(self.processes):
            process.stop()

    def start(self, name, command, env):
        process = ServerProcess(name, command, self.tmp.name, env=env)
        self.processes.append(process)
        return process

    def test_rendered_cluster_serves(self):
        coordinator_bin = BIN_DIR / "moe-coordinator"
        metrics = True
        values = {"model": {"name": "tiny", "numExperts": 3, "hostPath": "/models-on-node"},
                  "workers": {"replicas": 2}, "metrics": {"enabled": metrics}}
        with helm.Chart.load(CHART) as chart:
            rendered = chart.render(values, name="demo", namespace=NAMESPACE)
        docs = [d for path, text in rendered.items() if not path.endswith("NOTES.txt")
                for d in yaml.safe_load_all(text) if d]
        by_kind = {d["kind"] + "/" + d["metadata"]["name"]: d for d in docs}
        config = by_kind["ConfigMap/demo-moe-cluster-config"]
        sts = by_kind["StatefulSet/demo-moe-cluster-worker"]
        deployment = by_kind["Deployment/demo-moe-cluster-coordinator"]

        # The ConfigMap as mounted, and the binaries where the image has them.
        config_dir = pathlib.Path(self.tmp.name, "config")
        config_dir.mkdir()
        for key, value in config["data"].items():
            (config_dir / key).write_text(value)
        base_env = {"PATH": os.environ["PATH"], "MOE_CONFIG_DIR": str(config_dir),
                    "MOE_BIN_DIR": str(BIN_DIR), "OMP_NUM_THREADS": "1"}

        worker = sts["spec"]["template"]["spec"]["containers"][0]
        mount = next(m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "config")
        addresses, worker_metrics = {}, {}
        workers = []
        for i in range(sts["spec"]["replicas"]):
            pod = f"{sts['metadata']['name']}-{i}"
            args = replace_flag(worker["args"], "model", MODEL)
            args = replace_flag(args, "listen", "127.0.0.1:0")
            if metrics:
                worker_metrics[pod] = free_port()
                args = replace_flag(args, "metrics-listen", f"127.0.0.1:{worker_metrics[pod]}")
            command = [c.replace(mount, str(config_dir)) for c in worker["command"]] + args
            env = dict(base_env, POD_NAME=pod, **{e["name"]: e["value"] for e in worker["env"]
                                                  if "value" in e})
            workers.append((pod, self.start(pod, command, env)))
        grpc_port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "grpc")
        for pod, process in workers:
            dns = f"{pod}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:{grpc_port}"
            addresses[dns] = process.wait_ready(START_TIMEOUT_S)

        coordinator = deployment["spec"]["template"]["spec"]["containers"][0]
        args = coordinator["args"]
        workers_flag = next(a for a in args if a.startswith("--workers="))
        listed = workers_flag.split("=", 1)[1].split(",")
        self.assertEqual(sorted(listed), sorted(addresses))
        args = replace_flag(args, "workers", ",".join(addresses[name] for name in listed))
        args = replace_flag(args, "model", MODEL)
        args = replace_flag(args, "listen", "127.0.0.1:0")
        args = replace_flag(args, "http-listen", "127.0.0.1:0")
        coordinator_metrics = free_port()
        if metrics:
            args = replace_flag(args, "metrics-listen", f"127.0.0.1:{coordinator_metrics}")
        self.assertEqual(coordinator["command"], ["/opt/moe-cluster/bin/moe-coordinator"])
        process = self.start("coordinator", [str(coordinator_bin)] + args, base_env)
        server = process.wait_ready(START_TIMEOUT_S)

        cli = str(BIN_DIR / "moe-cli")
        status = subprocess.run([cli, "status", "--server", server], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("cluster: SERVING", status.stdout)
        for i, (pod, _) in enumerate(workers):
            first, _, last = config["data"][f"worker-{i}.experts"].partition("-")
            address = addresses[listed[i]]
            self.assertRegex(status.stdout, rf"{re.escape(address)}\s+ready\s+\[{first}, "
                                            rf"{int(last or first) + 1}\)")
            log = pathlib.Path(self.tmp.name, f"{pod}.log").read_text()
            self.assertIn(f"hosts experts {config['data'][f'worker-{i}.experts']}", log)

        generate = subprocess.run([cli, "generate", "--server", server, "--prompt", "Hello",
                                   "--max-tokens", "4"], capture_output=True, text=True,
                                  timeout=60)
        self.assertEqual(generate.returncode, 0, generate.stderr)
        self.assertIn("4 generated", generate.stderr)

        # The rendered --http-listen serves the OpenAI API.
        http = process.announced["HTTP"]
        request = urllib.request.Request(
            f"http://{http}/v1/completions", method="POST",
            data=b'{"prompt": "Hello", "max_tokens": 4, "temperature": 0}',
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            completion = json.loads(r.read())
        self.assertEqual(completion["usage"]["completion_tokens"], 4)

        if metrics:
            for port in [coordinator_metrics] + list(worker_metrics.values()):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    body = r.read().decode()
                self.assertIn("moe_build_info{", body)
                self.assertRegex(body, r"moe_(expert_tokens|worker_rows)_total\{")

        for proc in reversed(self.processes):
            self.assertEqual(proc.stop(), 0, proc.log.read_text()[-2000:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bin-dir", type=pathlib.Path)
    args, rest = parser.parse_known_args()
    BIN_DIR = args.bin_dir.resolve() if args.bin_dir else None
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
