#!/usr/bin/env python3
"""Tests of the Helm chart deploy/helm/moe-cluster.

Renders the chart with Helm's own template engine (Helm v4's Go SDK, loaded in-process from
PyPI's helm-python-sdk; no helm binary, no cluster), validates every manifest against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and checks what
the schemas cannot: the worker DNS list, the expert placement, the probes, the security
context, the GPU request, the disruption budgets, the ServiceMonitor and the dashboard.

Run from the repository root with the venv of tools/deploy/setup_venv.sh (CTest does both):
    build/venv-deploy/bin/python tests/deploy/chart_test.py
"""

import base64
import collections
import copy
import json
import os
import pathlib
import re
import subprocess
import sys
import shutil
import tempfile
import unittest

import helm_python as helm
import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "moe-cluster"
EXAMPLES = REPO / "deploy" / "examples"
HELM_TEMPLATE = REPO / "tools" / "deploy" / "helm_template.py"
GRAFANA_DASHBOARD = REPO / "deploy" / "grafana" / "moe-cluster.json"
CHART_DASHBOARD = CHART / "dashboards" / "moe-cluster.json"
VALUE_SETS = ("cpu-2-workers", "gpu-4-workers")
# The chart's kubeVersion floor (gRPC probes GA) and the newest schema kubernetes-validate has.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE = "demo"
NAMESPACE = "moe"
# Kinds whose schema is not Kubernetes' own (CRDs): structure checked by hand below.
CRD_KINDS = {"ServiceMonitor"}


def load_values(value_set):
    with open(CHART / "ci" / f"{value_set}.yaml") as f:
        return yaml.safe_load(f)


def minimal_values(**overrides):
    """The two required values, plus overrides keyed by path: workers__replicas=4."""
    values = {"model": {"numExperts": 32, "hostPath": "/models-on-node"}}
    for path, value in overrides.items():
        node = values
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return values


class Rendered:
    """One rendering of the chart: the manifests by kind and name, and NOTES.txt."""

    def __init__(self, chart, values, release=RELEASE, namespace=NAMESPACE):
        self.values = chart.merge_values(values)
        self.release = release
        self.namespace = namespace
        self.notes = ""
        self.docs = []
        for path, text in chart.render(values, name=release, namespace=namespace).items():
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.docs.extend(d for d in yaml.safe_load_all(text) if d)

    def of_kind(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, component):
        found = [d for d in self.of_kind(kind)
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"expected one {kind} for {component}, got {len(found)}"
        return found[0]

    def config(self):
        return self.one("ConfigMap", "config")

    def statefulset(self):
        return self.one("StatefulSet", "worker")

    def coordinator(self):
        return self.one("Deployment", "coordinator")

    def workloads(self):
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")


def parse_range(spec, num_experts):
    """Expert ids of an inclusive "A-B", "A" or "all" (the worker's --experts syntax)."""
    if spec == "all":
        return list(range(num_experts))
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def flag(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


class ChartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.chart = helm.Chart.load(CHART)
        cls.rendered = {vs: Rendered(cls.chart, load_values(vs)) for vs in VALUE_SETS}

    @classmethod
    def tearDownClass(cls):
        cls.chart.close()

    def render(self, values, **kwargs):
        return Rendered(self.chart, values, **kwargs)

    def assertRenderFails(self, values, *fragments):
        with self.assertRaises(helm.HelmRenderError) as ctx:
            self.render(values)
        for fragment in fragments:
            self.assertIn(fragment, str(ctx.exception))

    # ---- the chart itself ----

    def test_chart_metadata(self):
        meta = self.chart.metadata
        self.assertEqual(meta["apiVersion"], "v2")
        self.assertEqual(meta["name"], "moe-cluster")
        self.assertTrue((CHART / "templates" / "_helpers.tpl").is_file())

    def test_helm_lint_is_clean(self):
        for vs in VALUE_SETS:
            report = helm.lint(CHART, load_values(vs), strict=True, namespace=NAMESPACE)
            self.assertEqual(report["errors"], [], vs)
            serious = [m for m in report["messages"] if m["severity"] >= 2]
            self.assertEqual(serious, [], vs)

    def test_every_value_is_documented(self):
        """Each value has a comment right above it, or sits under a key that has one."""
        undocumented = []
        stack = []  # (indent, documented) of the enclosing keys
        previous = ""
        for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped:
                continue
            match = re.match(r"^(\s*)(- )?([A-Za-z0-9_./-]+):(.*)$", line)
            if stripped.startswith("#") or not match:
                previous = stripped
                continue
            indent = len(match.group(1)) + (2 if match.group(2) else 0)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = previous.startswith("#") or any(d for _, d in stack)
            is_leaf = match.group(4).strip() != ""
            if is_leaf and not documented:
                undocumented.append(f"values.yaml:{number}: {stripped}")
            stack.append((indent, documented))
            previous = stripped
        self.assertEqual(undocumented, [])

    # ---- schema validation ----

    def test_manifests_validate_against_kubernetes_schemas(self):
        for vs, rendered in self.rendered.items():
            kinds = collections.Counter(d["kind"] for d in rendered.docs)
            for kind in ("Deployment", "StatefulSet", "Service", "ConfigMap",
                         "PodDisruptionBudget"):
                self.assertIn(kind, kinds, vs)
            for doc in rendered.docs:
                if doc["kind"] in CRD_KINDS:
                    continue
                for version in KUBE_VERSIONS:
                    with self.subTest(value_set=vs, kind=doc["kind"], kube=version):
                        kubernetes_validate.validate(doc, version, strict=True)
                self.assertEqual(doc["metadata"]["namespace"], NAMESPACE)

    def test_default_values_with_the_required_ones_validate(self):
        rendered = self.render(minimal_values())
        for doc in rendered.docs:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)

    def test_examples_validate_against_kubernetes_schemas(self):
        examples = sorted(EXAMPLES.glob("*.yaml"))
        self.assertTrue(examples)
        for path in examples:
            for doc in yaml.safe_load_all(path.read_text()):
                for version in KUBE_VERSIONS:
                    with self.subTest(example=path.name, kind=doc["kind"], kube=version):
                        kubernetes_validate.validate(doc, version, strict=True)

    def test_helm_template_tool(self):
        ci = CHART / "ci" / "cpu-2-workers.yaml"
        result = subprocess.run(
            [sys.executable, HELM_TEMPLATE, CHART, "-f", ci, "--set", "workers.replicas=3",
             "--name", RELEASE, "--namespace", NAMESPACE],
            capture_output=True, text=True, check=True)
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        config = next(d for d in docs if d["metadata"]["name"] == "demo-moe-cluster-config")
        self.assertEqual([config["data"][f"worker-{i}.experts"] for i in range(3)],
                         ["0-9", "10-20", "21-31"])
        result = subprocess.run(
            [sys.executable, HELM_TEMPLATE, CHART, "-f", ci, "--set", "workers.replicas=40"],
            capture_output=True, text=True)
        self.assertEqual(result.returncode, 1)
        self.assertIn("workers.replicas (40) is larger than model.numExperts (32)", result.stderr)

    def test_service_monitor_structure(self):
        rendered = self.rendered["gpu-4-workers"]
        monitors = rendered.of_kind("ServiceMonitor")
        self.assertEqual(len(monitors), 1)
        sm = monitors[0]
        self.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(set(sm), {"apiVersion", "kind", "metadata", "spec"})
        self.assertEqual(sm["metadata"]["labels"]["release"], "kube-prometheus-stack")
        spec = sm["spec"]
        self.assertEqual(set(spec), {"selector", "namespaceSelector", "endpoints"})
        self.assertEqual(spec["namespaceSelector"], {"matchNames": [NAMESPACE]})
        selector = spec["selector"]["matchLabels"]
        selected = [s for s in rendered.of_kind("Service")
                    if selector.items() <= s["metadata"]["labels"].items()]
        components = sorted(s["metadata"]["labels"]["app.kubernetes.io/component"]
                            for s in selected)
        self.assertEqual(components, ["coordinator", "worker"])
        self.assertTrue(spec["endpoints"])
        for endpoint in spec["endpoints"]:
            self.assertLessEqual(set(endpoint), {"port", "path", "interval", "scrapeTimeout"})
            self.assertEqual(endpoint["path"], "/metrics")
            for key in ("interval", "scrapeTimeout"):
                self.assertRegex(endpoint[key], r"^[0-9]+(ms|s|m|h)$")
            for service in selected:
                self.assertIn(endpoint["port"], [p["name"] for p in service["spec"]["ports"]])
        # Off unless asked for.
        self.assertEqual(self.rendered["cpu-2-workers"].of_kind("ServiceMonitor"), [])

    # ---- workers, their DNS names and the placement ----

    def test_statefulset_replicas_equal_workers(self):
        for vs, rendered in self.rendered.items():
            sts = rendered.statefulset()
            self.assertEqual(sts["spec"]["replicas"], rendered.values["workers"]["replicas"])
            headless = rendered.one("Service", "worker")
            self.assertEqual(sts["spec"]["serviceName"], headless["metadata"]["name"])
            self.assertEqual(headless["spec"]["clusterIP"], "None")
        self.assertEqual(self.rendered["cpu-2-workers"].statefulset()["spec"]["replicas"], 2)
        self.assertEqual(self.rendered["gpu-4-workers"].statefulset()["spec"]["replicas"], 4)

    def expected_worker_addresses(self, rendered):
        sts = rendered.statefulset()
        service = sts["spec"]["serviceName"]
        port = rendered.values["workers"]["port"]
        return [f"{sts['metadata']['name']}-{i}.{service}.{rendered.namespace}.svc.cluster.local"
                f":{port}" for i in range(sts["spec"]["replicas"])]

    def test_coordinator_dials_every_worker_exactly_once(self):
        for vs, rendered in self.rendered.items():
            container = rendered.coordinator()["spec"]["template"]["spec"]["containers"][0]
            workers = flag(container["args"], "workers").split(",")
            expected = self.expected_worker_addresses(rendered)
            counts = collections.Counter(workers)
            self.assertEqual(sorted(counts), sorted(expected), vs)
            self.assertTrue(all(c == 1 for c in counts.values()), counts)
            self.assertEqual(rendered.config()["data"]["workers"], ",".join(workers))

    def placement(self, rendered):
        data = rendered.config()["data"]
        replicas = rendered.statefulset()["spec"]["replicas"]
        keys = sorted(k for k in data if k.endswith(".experts"))
        self.assertEqual(keys, sorted(f"worker-{i}.experts" for i in range(replicas)))
        return [data[f"worker-{i}.experts"] for i in range(replicas)]

    def test_every_expert_is_placed_exactly_once(self):
        for vs, rendered in self.rendered.items():
            experts = rendered.values["model"]["numExperts"]
            placed = [e for spec in self.placement(rendered) for e in parse_range(spec, experts)]
            self.assertEqual(sorted(placed), list(range(experts)), vs)
        self.assertEqual(self.placement(self.rendered["cpu-2-workers"]), ["0-15", "16-31"])
        self.assertEqual(self.placement(self.rendered["gpu-4-workers"]),
                         ["0-7", "8-15", "16-23", "24-31"])

    def test_placement_is_contiguous_floor_slices(self):
        for experts in (1, 2, 3, 4, 5, 8, 16, 32, 60):
            for workers in sorted({1, 2, 3, 4, 7, experts} & set(range(1, experts + 1))):
                with self.subTest(experts=experts, workers=workers):
                    rendered = self.render(minimal_values(model__numExperts=experts,
                                                          workers__replicas=workers))
                    expected = [f"{experts * i // workers}-{experts * (i + 1) // workers - 1}"
                                for i in range(workers)]
                    self.assertEqual(self.placement(rendered), expected)

    def test_placement_override(self):
        rendered = self.render(minimal_values(placement__ranges=["0-9", "10-31"]))
        self.assertEqual(self.placement(rendered), ["0-9", "10-31"])
        # Overlaps are replicas, and may outnumber the experts.
        rendered = self.render(minimal_values(model__numExperts=2, workers__replicas=3,
                                              placement__ranges=["0-1", "0", "all"]))
        self.assertEqual(self.placement(rendered), ["0-1", "0", "all"])

    def test_worker_device_follows_the_gpu_request(self):
        for values, device in (("cpu-2-workers", "cpu"), ("gpu-4-workers", "cuda")):
            container = self.rendered[values].statefulset()["spec"]["template"]["spec"][
                "containers"][0]
            self.assertEqual(flag(container["args"], "device"), device, values)
        rendered = self.render(minimal_values(workers__gpu=1, workers__device="cuda:1"))
        container = rendered.statefulset()["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(container["args"], "device"), "cuda:1")

    def test_worker_entrypoint_starts_each_pod_with_its_range(self):
        """Runs the rendered worker command in a shell against the rendered ConfigMap."""
        rendered = self.rendered["gpu-4-workers"]
        sts = rendered.statefulset()
        container = sts["spec"]["template"]["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        with tempfile.TemporaryDirectory() as tmp:
            config_dir = pathlib.Path(tmp, "config")
            bin_dir = pathlib.Path(tmp, "bin")
            config_dir.mkdir()
            bin_dir.mkdir()
            for key, value in rendered.config()["data"].items():
                (config_dir / key).write_text(value)
            fake = bin_dir / "moe-expert-worker"
            fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
            fake.chmod(0o755)
            command = [c.replace(mount["mountPath"], str(config_dir))
                       for c in container["command"]] + container["args"]
            env = {"PATH": os.environ["PATH"], "MOE_CONFIG_DIR": str(config_dir),
                   "MOE_BIN_DIR": str(bin_dir)}
            for i, expected in enumerate(self.placement(rendered)):
                env["POD_NAME"] = f"{sts['metadata']['name']}-{i}"
                out = subprocess.run(command, env=env, capture_output=True, text=True,
                                     check=True).stdout.splitlines()
                self.assertEqual(out, [f"--experts={expected}"] + container["args"])
            # A pod the placement does not know (kubectl scale) exits with advice.
            env["POD_NAME"] = f"{sts['metadata']['name']}-4"
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            self.assertEqual(result.returncode, 1)
            self.assertIn("helm upgrade --set workers.replicas=N", result.stderr)

    def test_long_release_names_keep_dns_labels_valid(self):
        release = "r" * 53  # Helm's longest release name
        rendered = self.render(minimal_values(workers__replicas=32), release=release)
        sts = rendered.statefulset()
        self.assertLessEqual(len(sts["metadata"]["name"]), 52)
        self.assertLessEqual(len(f"{sts['metadata']['name']}-31"), 63)
        for doc in rendered.docs:
            self.assertLessEqual(len(doc["metadata"]["name"]), 63)
            self.assertRegex(doc["metadata"]["name"], r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

    # ---- containers ----

    def test_every_probe_is_grpc_on_the_grpc_port(self):
        for vs, rendered in self.rendered.items():
            expected_port = {"Deployment": rendered.values["coordinator"]["port"],
                             "StatefulSet": rendered.values["workers"]["port"]}
            for workload in rendered.workloads():
                for container in workload["spec"]["template"]["spec"]["containers"]:
                    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                    self.assertEqual(ports["grpc"], expected_port[workload["kind"]])
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        with self.subTest(value_set=vs, kind=workload["kind"], probe=probe):
                            spec = container[probe]
                            # (with tls.enabled they are TCP: test_tls_generated_or_from_a_secret)
                            handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(spec)
                            self.assertEqual(handlers, {"grpc"})
                            self.assertEqual(spec["grpc"]["port"], ports["grpc"])

    def test_containers_run_non_root_with_read_only_root(self):
        for vs, rendered in self.rendered.items():
            for workload in rendered.workloads():
                pod = workload["spec"]["template"]["spec"]
                pod_ctx = pod.get("securityContext", {})
                self.assertFalse(pod.get("hostNetwork", False))
                for container in pod["containers"] + pod.get("initContainers", []):
                    with self.subTest(value_set=vs, container=container["name"]):
                        ctx = {**pod_ctx, **container.get("securityContext", {})}
                        self.assertIs(ctx.get("runAsNonRoot"), True)
                        self.assertNotEqual(ctx.get("runAsUser", 0), 0)
                        self.assertIs(ctx.get("readOnlyRootFilesystem"), True)
                        self.assertIs(ctx.get("allowPrivilegeEscalation"), False)
                        self.assertFalse(ctx.get("privileged", False))
                        self.assertIn("ALL", ctx.get("capabilities", {}).get("drop", []))
                        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                        model_path = f"/models/{rendered.values['model']['name']}"
                        self.assertIs(mounts[model_path]["readOnly"], True)

    def test_gpu_value_set_requests_gpus(self):
        worker = self.rendered["gpu-4-workers"].statefulset()
        resources = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
        self.assertEqual(resources["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(resources["requests"]["nvidia.com/gpu"], 1)
        self.assertEqual(resources["requests"]["cpu"], "4")  # the value set's, kept
        for workload in self.rendered["cpu-2-workers"].workloads():
            text = json.dumps(workload["spec"]["template"]["spec"]["containers"])
            self.assertNotIn("nvidia.com/gpu", text)

    def test_nccl_gives_the_coordinator_a_gpu_the_flag_and_both_pods_the_nccl_env(self):
        rendered = self.render(minimal_values(workers__gpu=1, nccl__enabled=True,
                                              workers__runtimeClassName="nvidia"))
        coordinator = rendered.coordinator()["spec"]["template"]["spec"]
        container = coordinator["containers"][0]
        self.assertEqual(flag(container["args"], "nccl-device"), "cuda")
        self.assertEqual(container["resources"]["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(container["resources"]["requests"]["nvidia.com/gpu"], 1)
        self.assertEqual(coordinator["runtimeClassName"], "nvidia")
        for workload in (rendered.coordinator(), rendered.statefulset()):
            env = {e["name"]: e.get("value")
                   for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
            self.assertEqual(env["NCCL_SOCKET_IFNAME"], "eth0")
            self.assertEqual(env["NCCL_DEBUG"], "WARN")
        # Off by default: no flag, no GPU for the coordinator, no NCCL environment.
        for values in ("cpu-2-workers", "gpu-4-workers"):
            coordinator = self.rendered[values].coordinator()["spec"]["template"]["spec"]
            container = coordinator["containers"][0]
            self.assertFalse([a for a in container["args"] if a.startswith("--nccl-device")])
            self.assertNotIn("nvidia.com/gpu", json.dumps(container["resources"]))
            self.assertNotIn("NCCL_", json.dumps(container["env"]))
        self.assertRenderFails(minimal_values(nccl__enabled=True), "nccl.enabled", "workers.gpu")

    def test_model_volume_is_a_claim_or_a_host_path(self):
        volumes = self.rendered["cpu-2-workers"].statefulset()["spec"]["template"]["spec"]
        model = next(v for v in volumes["volumes"] if v["name"] == "model")
        self.assertEqual(model["persistentVolumeClaim"],
                         {"claimName": "moe-models", "readOnly": True})
        volumes = self.rendered["gpu-4-workers"].coordinator()["spec"]["template"]["spec"]
        model = next(v for v in volumes["volumes"] if v["name"] == "model")
        self.assertEqual(model["hostPath"],
                         {"path": "/mnt/models/psychoorca", "type": "Directory"})
        for rendered in self.rendered.values():
            for workload in rendered.workloads():
                args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
                self.assertEqual(flag(args, "model"), "/models/psychoorca")

    def test_metrics_ports_and_flags(self):
        rendered = self.rendered["cpu-2-workers"]
        for workload, port in ((rendered.coordinator(), 9400), (rendered.statefulset(), 9401)):
            template = workload["spec"]["template"]
            container = template["spec"]["containers"][0]
            self.assertEqual(flag(container["args"], "metrics-listen"), f"0.0.0.0:{port}")
            self.assertIn({"name": "metrics", "containerPort": port, "protocol": "TCP"},
                          container["ports"])
            self.assertEqual(template["metadata"]["annotations"]["prometheus.io/port"], str(port))
        off = self.render(minimal_values(metrics__enabled=False))
        for workload in off.workloads():
            container = workload["spec"]["template"]["spec"]["containers"][0]
            self.assertFalse([a for a in container["args"] if a.startswith("--metrics-listen")])

    def test_http_api_port_and_flag(self):
        rendered = self.rendered["cpu-2-workers"]
        container = rendered.coordinator()["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(flag(container["args"], "http-listen"), "0.0.0.0:8000")
        self.assertIn({"name": "http", "containerPort": 8000, "protocol": "TCP"},
                      container["ports"])
        service = next(s for s in rendered.of_kind("Service")
                       if s["metadata"]["name"].endswith("coordinator"))
        self.assertIn({"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"},
                      service["spec"]["ports"])
        off = self.render(minimal_values(coordinator__http__enabled=False))
        container = off.coordinator()["spec"]["template"]["spec"]["containers"][0]
        self.assertFalse([a for a in container["args"] if a.startswith("--http-listen")])
        self.assertNotIn("http", [p["name"] for p in container["ports"]])

    def test_drain_flags_grace_periods_and_pre_stop(self):
        rendered = self.rendered["cpu-2-workers"]
        pod = rendered.coordinator()["spec"]["template"]["spec"]
        container = pod["containers"][0]
        self.assertEqual(flag(container["args"], "drain-timeout"), "30s")
        self.assertEqual(flag(container["args"], "on-expert-loss"), "fail")
        self.assertEqual(container["lifecycle"]["preStop"]["exec"]["command"], ["sleep", "5"])
        self.assertGreaterEqual(pod["terminationGracePeriodSeconds"], 5 + 30 + 5)
        worker_pod = rendered.statefulset()["spec"]["template"]["spec"]
        self.assertEqual(flag(worker_pod["containers"][0]["args"], "drain-timeout"), "10s")
        self.assertGreaterEqual(worker_pod["terminationGracePeriodSeconds"], 10 + 5)
        reroute = self.render(minimal_values(coordinator__onExpertLoss="reroute"))
        args = reroute.coordinator()["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertEqual(flag(args, "on-expert-loss"), "reroute")

    def test_tls_generated_or_from_a_secret(self):
        # Off by default: no TLS flags, no Secret.
        plain = self.rendered["cpu-2-workers"]
        self.assertFalse([s for s in plain.of_kind("Secret") if s["metadata"]["name"].endswith("-tls")])
        for workload in plain.workloads():
            args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
            self.assertFalse([a for a in args if a.startswith("--tls-")])
        # Generated: one Secret with a CA and a certificate for the Service names, mounted in
        # both pods, and the flags naming its files; probes fall back to TCP (the kubelet's gRPC
        # probe cannot speak TLS).
        on = self.render(minimal_values(tls__enabled=True))
        secrets = [s for s in on.of_kind("Secret") if s["metadata"]["name"].endswith("-tls")]
        self.assertEqual(len(secrets), 1)
        data = secrets[0]["data"]
        self.assertEqual(set(data), {"ca.crt", "tls.crt", "tls.key"})
        cert = base64.b64decode(data["tls.crt"]).decode()
        self.assertIn("BEGIN CERTIFICATE", cert)
        for workload in on.workloads():
            pod = workload["spec"]["template"]["spec"]
            container = pod["containers"][0]
            self.assertEqual(flag(container["args"], "tls-cert"), "/etc/moe-cluster/tls/tls.crt")
            self.assertEqual(flag(container["args"], "tls-key"), "/etc/moe-cluster/tls/tls.key")
            self.assertEqual(flag(container["args"], "tls-ca"), "/etc/moe-cluster/tls/ca.crt")
            self.assertIn({"name": "tls", "mountPath": "/etc/moe-cluster/tls", "readOnly": True},
                          container["volumeMounts"])
            volume = next(v for v in pod["volumes"] if v["name"] == "tls")
            self.assertEqual(volume["secret"]["secretName"], secrets[0]["metadata"]["name"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                self.assertIn("tcpSocket", container[probe])
        # The generated certificate is valid for the worker and coordinator names, and both
        # verify against the CA (openssl, when present).
        if shutil.which("openssl"):
            with tempfile.TemporaryDirectory() as d:
                for key in ("ca.crt", "tls.crt"):
                    pathlib.Path(d, key).write_bytes(base64.b64decode(data[key]))
                out = subprocess.run(["openssl", "verify", "-CAfile", f"{d}/ca.crt",
                                      f"{d}/tls.crt"], capture_output=True, text=True)
                self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
                text = subprocess.run(["openssl", "x509", "-in", f"{d}/tls.crt", "-noout",
                                       "-text"], capture_output=True, text=True).stdout
                self.assertIn("DNS:*.demo-moe-cluster-worker-headless.moe.svc.cluster.local", text)
                self.assertIn("DNS:demo-moe-cluster-coordinator.moe.svc", text)
                self.assertIn("TLS Web Client Authentication", text)
        # An existing Secret (cert-manager's layout) is used as is; none is generated.
        mounted = self.render(minimal_values(tls__enabled=True, tls__secretName="moe-certs"))
        self.assertFalse([s for s in mounted.of_kind("Secret") if s["metadata"]["name"].endswith("-tls")])
        pod = mounted.coordinator()["spec"]["template"]["spec"]
        self.assertEqual(next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"],
                         "moe-certs")

    def test_api_tokens_from_a_secret(self):
        container = self.rendered["cpu-2-workers"].coordinator()["spec"]["template"]["spec"][
            "containers"][0]
        self.assertFalse([a for a in container["args"] if a.startswith("--api-token-file")])
        on = self.render(minimal_values(coordinator__apiTokens__secretName="moe-api-tokens"))
        pod = on.coordinator()["spec"]["template"]["spec"]
        container = pod["containers"][0]
        self.assertEqual(flag(container["args"], "api-token-file"),
                         "/etc/moe-cluster/api-tokens/tokens")
        self.assertIn({"name": "api-tokens", "mountPath": "/etc/moe-cluster/api-tokens",
                       "readOnly": True}, container["volumeMounts"])
        volume = next(v for v in pod["volumes"] if v["name"] == "api-tokens")
        self.assertEqual(volume["secret"]["secretName"], "moe-api-tokens")

    def test_services_select_their_pods(self):
        for vs, rendered in self.rendered.items():
            for workload in rendered.workloads():
                labels = workload["spec"]["template"]["metadata"]["labels"]
                self.assertLessEqual(workload["spec"]["selector"]["matchLabels"].items(),
                                     labels.items())
            for service in rendered.of_kind("Service"):
                matched = [w for w in rendered.workloads() if service["spec"]["selector"].items()
                           <= w["spec"]["template"]["metadata"]["labels"].items()]
                self.assertEqual(len(matched), 1, service["metadata"]["name"])
                names = {p["name"] for p in matched[0]["spec"]["template"]["spec"]
                         ["containers"][0]["ports"]}
                for port in service["spec"]["ports"]:
                    self.assertIn(port["targetPort"], names)

    # ---- disruption budgets, dashboard, notes ----

    def test_worker_pod_disruption_budget(self):
        for vs, rendered in self.rendered.items():
            pdb = rendered.one("PodDisruptionBudget", "worker")
            labels = rendered.statefulset()["spec"]["template"]["metadata"]["labels"]
            self.assertLessEqual(pdb["spec"]["selector"]["matchLabels"].items(), labels.items())
            self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        pdb = self.render(minimal_values(workers__podDisruptionBudget={"minAvailable": "100%"}))
        self.assertEqual(pdb.one("PodDisruptionBudget", "worker")["spec"],
                         {"minAvailable": "100%",
                          "selector": pdb.one("PodDisruptionBudget", "worker")["spec"]["selector"]})
        coordinator = self.rendered["gpu-4-workers"].one("PodDisruptionBudget", "coordinator")
        self.assertEqual(coordinator["spec"]["maxUnavailable"], 1)

    def test_dashboard_configmap(self):
        for vs, rendered in self.rendered.items():
            cm = rendered.one("ConfigMap", "dashboard")
            self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "1")
            self.assertEqual(list(cm["data"]), ["moe-cluster.json"])
            self.assertEqual(json.loads(cm["data"]["moe-cluster.json"]),
                             json.loads(CHART_DASHBOARD.read_text()))
        self.assertEqual(
            [d for d in self.render(minimal_values()).of_kind("ConfigMap")
             if d["metadata"]["labels"].get("app.kubernetes.io/component") == "dashboard"], [])

    def test_chart_dashboard_is_a_copy_of_deploy_grafana(self):
        chart_copy = CHART_DASHBOARD.read_bytes()
        if GRAFANA_DASHBOARD.exists():
            self.assertEqual(
                chart_copy, GRAFANA_DASHBOARD.read_bytes(),
                "the chart's dashboard differs from deploy/grafana/moe-cluster.json; run: "
                "cp deploy/grafana/moe-cluster.json deploy/helm/moe-cluster/dashboards/")
        else:  # the placeholder, until deploy/grafana/moe-cluster.json exists
            self.assertEqual(json.loads(chart_copy), {})

    def test_notes_tell_how_to_query(self):
        notes = self.rendered["cpu-2-workers"].notes
        self.assertIn("kubectl -n moe port-forward service/demo-moe-cluster-coordinator "
                      "50051:50051", notes)
        self.assertIn("moe-cli generate --server localhost:50051 --prompt", notes)
        self.assertIn("moe-cli status --server localhost:50051", notes)
        self.assertIn("8000:8000", notes)
        self.assertIn("localhost:8000/v1/completions", notes)
        self.assertIn("demo-moe-cluster-worker-1  experts 16-31", notes)

    # ---- rendering refuses impossible values ----

    def test_more_workers_than_experts_fails(self):
        self.assertRenderFails(minimal_values(workers__replicas=33),
                               "workers.replicas (33) is larger than model.numExperts (32)")
        self.assertRenderFails(minimal_values(model__numExperts=3, workers__replicas=4),
                               "workers.replicas (4) is larger than model.numExperts (3)")

    def test_bad_values_fail_with_the_value_to_fix(self):
        cases = [
            (minimal_values(model__numExperts=None), "model.numExperts is required"),
            (minimal_values(model__numExperts=0), "model.numExperts is 0"),
            (minimal_values(workers__replicas=0), "workers.replicas is 0"),
            (minimal_values(placement__ranges=["0-31"]),
             "placement.ranges lists 1 ranges but workers.replicas is 2"),
            (minimal_values(placement__ranges=["0-15", "17-31"]),
             "leaves expert 16 without a worker"),
            (minimal_values(placement__ranges=["0-15", "16-32"]),
             'placement.ranges[1] = "16-32": not a range of expert ids within 0-31'),
            (minimal_values(placement__ranges=["0-15", "31-16"]), 'placement.ranges[1] = "31-16"'),
            (minimal_values(placement__ranges=["0-15", "16..31"]),
             'placement.ranges[1] = "16..31": expected an inclusive range'),
            (minimal_values(model__hostPath=""), "no model volume"),
            (minimal_values(coordinator__drainTimeoutSeconds=60),
             "coordinator.terminationGracePeriodSeconds is 45: it must be at least "
             "preStopSleepSeconds (5) + drainTimeoutSeconds (60) + 5"),
            (minimal_values(workers__terminationGracePeriodSeconds=12),
             "workers.terminationGracePeriodSeconds is 12: it must be at least "
             "drainTimeoutSeconds (10) + 5"),
            (minimal_values(coordinator__onExpertLoss="retry"),
             'coordinator.onExpertLoss is "retry"'),
            (minimal_values(model__pvc={"claimName": "models"}),
             "set only one of model.pvc.claimName and model.hostPath"),
        ]
        for values, message in cases:
            with self.subTest(message=message):
                self.assertRenderFails(values, message)


if __name__ == "__main__":
    unittest.main(verbosity=2)
