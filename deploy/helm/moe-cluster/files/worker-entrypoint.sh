#!/bin/sh
# Entrypoint of the expert-worker pods: starts moe-expert-worker with this pod's expert range.
#
# A StatefulSet has one pod template, so the range cannot be a literal flag. The chart's
# ConfigMap, mounted at MOE_CONFIG_DIR, holds one file per worker ordinal, worker-<i>.experts,
# with the inclusive range "A-B" the chart computed from model.numExperts and workers.replicas
# (or took from placement.ranges). The ordinal is the suffix of the pod name, POD_NAME
# ("<release>-moe-cluster-worker-3" -> 3). Every argument goes on to moe-expert-worker.
set -eu

config_dir="${MOE_CONFIG_DIR:-/etc/moe-cluster}"
bin_dir="${MOE_BIN_DIR:-/opt/moe-cluster/bin}"
pod="${POD_NAME:-${HOSTNAME:-}}"
ordinal="${pod##*-}"
range_file="${config_dir}/worker-${ordinal}.experts"

if [ -z "$pod" ] || [ ! -r "$range_file" ]; then
  echo "worker-entrypoint: pod '${pod}' has no expert range (${range_file} is missing)." \
    "The placement in ${config_dir} lists workers 0..N-1 for workers.replicas = N:" \
    "scale with 'helm upgrade --set workers.replicas=N', which recomputes it, not with" \
    "'kubectl scale'." >&2
  exit 1
fi
experts="$(cat "$range_file")"
echo "worker-entrypoint: pod ${pod} hosts experts ${experts}" >&2
exec "${bin_dir}/moe-expert-worker" --experts="${experts}" "$@"
