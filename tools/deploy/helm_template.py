#!/usr/bin/env python3
"""`helm template` without the helm binary: renders a chart with Helm's Go SDK (PyPI
helm-python-sdk) and prints the manifests as helm does ("---" and "# Source:" per file).

    tools/deploy/setup_venv.sh
    build/venv-deploy/bin/python tools/deploy/helm_template.py deploy/helm/moe-cluster \\
        -f deploy/helm/moe-cluster/ci/cpu-2-workers.yaml --set workers.replicas=4 \\
        --name demo --namespace moe

Values merge like helm's: the chart's values.yaml, then each -f file in order, then each
--set. Exits 1 with Helm's message when rendering fails (e.g. a `fail` in the chart).
"""

import argparse
import sys

import helm_python as helm
import yaml


def deep_merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart", help="chart directory or .tgz")
    parser.add_argument("-f", "--values", action="append", default=[], help="values file")
    parser.add_argument("--set", action="append", default=[], help="key=value (helm --set)")
    parser.add_argument("--name", default="release-name", help="release name")
    parser.add_argument("--namespace", default="default", help="release namespace")
    parser.add_argument("--notes", action="store_true", help="print NOTES.txt too")
    args = parser.parse_args()

    values = {}
    for path in args.values:
        with open(path) as f:
            deep_merge(values, yaml.safe_load(f) or {})
    for expression in args.set:
        deep_merge(values, helm.parse_set_string(expression))
    try:
        with helm.Chart.load(args.chart) as chart:
            rendered = chart.render(values, name=args.name, namespace=args.namespace)
    except helm.HelmError as e:
        print(f"helm_template: {e}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        text = rendered[path].strip()
        if not text or (path.endswith("NOTES.txt") and not args.notes):
            continue
        print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
