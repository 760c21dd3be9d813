{{/*
Names, labels, the worker DNS list and the expert placement. Everything the templates compute
lives here, in small named pieces; the templates only place values.
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "moe-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: "<release>-moe-cluster" (or the release name when it already
contains the chart name), at most 40 characters so that "<prefix>-worker-headless" and the
worker pod names "<prefix>-worker-<i>" stay valid DNS labels (the StatefulSet name must leave
room for the controller-revision-hash label: 52 characters).
*/}}
{{- define "moe-cluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-cluster.coordinatorName" -}}
{{- printf "%s-coordinator" (include "moe-cluster.fullname" .) }}
{{- end }}

{{/* StatefulSet name; its pods are <workerName>-0 .. <workerName>-(replicas-1). */}}
{{- define "moe-cluster.workerName" -}}
{{- printf "%s-worker" (include "moe-cluster.fullname" .) }}
{{- end }}

{{/* Headless Service that gives each worker pod its DNS name. */}}
{{- define "moe-cluster.workerHeadlessName" -}}
{{- printf "%s-worker-headless" (include "moe-cluster.fullname" .) }}
{{- end }}

{{- define "moe-cluster.configName" -}}
{{- printf "%s-config" (include "moe-cluster.fullname" .) }}
{{- end }}

{{- define "moe-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the checkpoint is mounted in both pods. */}}
{{- define "moe-cluster.modelPath" -}}
{{- printf "/models/%s" .Values.model.name }}
{{- end }}

{{- define "moe-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moe-cluster
{{- end }}

{{/*
The coordinator's --workers value: every worker pod's stable DNS name and gRPC port, in ordinal
order, comma-separated.
*/}}
{{- define "moe-cluster.workerAddresses" -}}
{{- $names := list }}
{{- range $i := until (int .Values.workers.replicas) }}
{{- $names = append $names (printf "%s-%d.%s.%s.svc.%s:%d" (include "moe-cluster.workerName" $) $i (include "moe-cluster.workerHeadlessName" $) $.Release.Namespace $.Values.clusterDomain (int $.Values.workers.port)) }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/*
The expert placement as a JSON list, one inclusive range per worker ordinal. Default: worker i
of W hosts the contiguous slice [floor(E*i/W), floor(E*(i+1)/W)) of E experts, written "A-B".
placement.ranges replaces it; it must have one range per worker and cover every expert.
Fails rendering, with the value to change, on an impossible placement.
*/}}
{{- define "moe-cluster.placement" -}}
{{- $experts := int (required "model.numExperts is required: set it to config.json's num_local_experts (1 for a dense Llama/Mistral checkpoint)" .Values.model.numExperts) }}
{{- $workers := int .Values.workers.replicas }}
{{- if lt $experts 1 }}
{{- fail (printf "model.numExperts is %d: it must be at least 1 (config.json's num_local_experts)" $experts) }}
{{- end }}
{{- if lt $workers 1 }}
{{- fail (printf "workers.replicas is %d: the model's experts need at least one worker" $workers) }}
{{- end }}
{{- $ranges := list }}
{{- if .Values.placement.ranges }}
{{- if ne (len .Values.placement.ranges) $workers }}
{{- fail (printf "placement.ranges lists %d ranges but workers.replicas is %d: give exactly one expert range per worker" (len .Values.placement.ranges) $workers) }}
{{- end }}
{{- range $i, $r := .Values.placement.ranges }}
{{- $r = toString $r }}
{{- if not (regexMatch "^(all|[0-9]+(-[0-9]+)?)$" $r) }}
{{- fail (printf "placement.ranges[%d] = %q: expected an inclusive range \"A-B\", a single expert \"A\", or \"all\"" $i $r) }}
{{- end }}
{{- if ne $r "all" }}
{{- $bounds := splitList "-" $r }}
{{- if or (gt (atoi (first $bounds)) (atoi (last $bounds))) (ge (atoi (last $bounds)) $experts) }}
{{- fail (printf "placement.ranges[%d] = %q: not a range of expert ids within 0-%d (model.numExperts is %d)" $i $r (sub $experts 1) $experts) }}
{{- end }}
{{- end }}
{{- $ranges = append $ranges $r }}
{{- end }}
{{- range $e := until $experts }}
{{- $hosted := false }}
{{- range $r := $ranges }}
{{- if eq $r "all" }}
{{- $hosted = true }}
{{- else }}
{{- $bounds := splitList "-" $r }}
{{- if and (le (atoi (first $bounds)) $e) (ge (atoi (last $bounds)) $e) }}
{{- $hosted = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $hosted }}
{{- fail (printf "placement.ranges %v leaves expert %d without a worker: the ranges must cover every expert 0-%d" $ranges $e (sub $experts 1)) }}
{{- end }}
{{- end }}
{{- else }}
{{- if gt $workers $experts }}
{{- fail (printf "workers.replicas (%d) is larger than model.numExperts (%d): each worker hosts a contiguous slice of at least one expert; lower workers.replicas, or list placement.ranges to run replica workers" $workers $experts) }}
{{- end }}
{{- range $i := until $workers }}
{{- $ranges = append $ranges (printf "%d-%d" (div (mul $experts $i) $workers) (sub (div (mul $experts (add $i 1)) $workers) 1)) }}
{{- end }}
{{- end }}
{{- toJson $ranges }}
{{- end }}

{{/* Exactly one model volume source; returns nothing, fails rendering otherwise. */}}
{{- define "moe-cluster.validateModelVolume" -}}
{{- if and .Values.model.pvc.claimName .Values.model.hostPath }}
{{- fail "set only one of model.pvc.claimName and model.hostPath: the model volume is either an existing claim or a node directory" }}
{{- end }}
{{- if not (or .Values.model.pvc.claimName .Values.model.hostPath) }}
{{- fail "no model volume: set model.pvc.claimName (an existing PersistentVolumeClaim holding the checkpoint) or model.hostPath (its directory on the nodes)" }}
{{- end }}
{{- end }}

{{/* The model volume (PVC or hostPath), mounted read-only by both pods. */}}
{{- define "moe-cluster.modelVolume" -}}
{{- include "moe-cluster.validateModelVolume" . -}}
- name: model
{{- if .Values.model.pvc.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- end }}
{{- end }}

{{- define "moe-cluster.modelVolumeMount" -}}
- name: model
  mountPath: {{ include "moe-cluster.modelPath" . }}
  readOnly: true
{{- with .Values.model.pvc.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}

{{/*
Environment of both containers: the pod name (the worker entrypoint reads its ordinal from it),
OMP_NUM_THREADS from the container's CPU request (rounded up), then .Values.env.
Call with (dict "root" $ "container" "<container name>").
*/}}
{{- define "moe-cluster.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OMP_NUM_THREADS
  valueFrom:
    resourceFieldRef:
      containerName: {{ .container }}
      resource: requests.cpu
      divisor: "1"
{{- with .root.Values.env }}
{{ toYaml . }}
{{- end }}
{{- if .root.Values.nccl.enabled }}
{{- with .root.Values.nccl.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Prometheus scrape annotations of a pod. Call with (dict "root" $ "port" <metrics port>). */}}
{{- define "moe-cluster.scrapeAnnotations" -}}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget spec body: minAvailable when set, maxUnavailable otherwise. */}}
{{- define "moe-cluster.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ .maxUnavailable }}
{{- end }}
{{- end }}

{{/*
Termination budgets: the grace period must cover the preStop wait, the drain and a few seconds
to exit, or Kubernetes kills the process mid-drain. Fails rendering naming the values.
*/}}
{{- define "moe-cluster.validateGracePeriods" -}}
{{- $c := .Values.coordinator }}
{{- if not (has $c.onExpertLoss (list "fail" "reroute")) }}
{{- fail (printf "coordinator.onExpertLoss is %q: it must be \"fail\" or \"reroute\"" $c.onExpertLoss) }}
{{- end }}
{{- $need := add (int $c.preStopSleepSeconds) (int $c.drainTimeoutSeconds) 5 }}
{{- if lt (int $c.terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "coordinator.terminationGracePeriodSeconds is %d: it must be at least preStopSleepSeconds (%d) + drainTimeoutSeconds (%d) + 5" (int $c.terminationGracePeriodSeconds) (int $c.preStopSleepSeconds) (int $c.drainTimeoutSeconds)) }}
{{- end }}
{{- $w := .Values.workers }}
{{- if lt (int $w.terminationGracePeriodSeconds) (add (int $w.drainTimeoutSeconds) 5 | int) }}
{{- fail (printf "workers.terminationGracePeriodSeconds is %d: it must be at least drainTimeoutSeconds (%d) + 5" (int $w.terminationGracePeriodSeconds) (int $w.drainTimeoutSeconds)) }}
{{- end }}
{{- end }}

{{/*
TLS: the Secret holding ca.crt, tls.crt and tls.key, and the flags and mounts that use it.
*/}}
{{- define "moe-cluster.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "moe-cluster.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "moe-cluster.tlsArgs" -}}
{{- if .Values.tls.enabled -}}
- --tls-cert=/etc/moe-cluster/tls/tls.crt
- --tls-key=/etc/moe-cluster/tls/tls.key
- --tls-ca=/etc/moe-cluster/tls/ca.crt
{{- end }}
{{- end }}

{{- define "moe-cluster.tlsMount" -}}
{{- if .Values.tls.enabled -}}
- name: tls
  mountPath: /etc/moe-cluster/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "moe-cluster.tlsVolume" -}}
{{- if .Values.tls.enabled -}}
- name: tls
  secret:
    secretName: {{ include "moe-cluster.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
A probe's handler: gRPC health on the port, or with TLS a TCP connect (the kubelet's gRPC probe
speaks plaintext only). Call with (dict "root" $ "port" N).
*/}}
{{- define "moe-cluster.probeHandler" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: {{ .port }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end }}
{{- end }}
