{{/* The chart's name, or nameOverride. */}}
{{- define "lmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects' name: release-chart, or fullnameOverride. */}}
{{- define "lmserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the writable paths live: the state file, on an emptyDir. */}}
{{- define "lmserve.stateDir" -}}/var/lib/lmserve{{- end }}

{{/*
lmserve.toml, rendered from the values: the server, runtime and model settings, TLS and API
keys when enabled, the routes, and .Values.config merged over all of it. Called with a context
whose omitRoutes is true, it leaves the routes out: what the pods' checksum covers, since the
server reloads its routes in place and only the other settings need a restart.
*/}}
{{- define "lmserve.config" -}}
{{- $server := dict
    "grpc_addr" (printf "0.0.0.0:%d" (int .Values.server.grpcPort))
    "metrics_addr" (printf "0.0.0.0:%d" (int .Values.server.metricsPort))
    "reflection" .Values.server.reflection
    "drain_delay_ms" (mul (int .Values.server.drainDelaySeconds) 1000)
    "shutdown_grace_ms" (mul (int .Values.server.shutdownGraceSeconds) 1000)
    "ready_when" .Values.server.readyWhen -}}
{{- if gt (int .Values.server.adminPort) 0 }}
{{- $_ := set $server "admin_addr" (printf "0.0.0.0:%d" (int .Values.server.adminPort)) }}
{{- end }}
{{- $runtime := dict
    "execution_providers" .Values.runtime.executionProviders
    "intra_threads" (int .Values.runtime.intraThreads)
    "sessions_per_model" (int .Values.runtime.sessionsPerModel)
    "split_under_load" .Values.runtime.splitUnderLoad -}}
{{- if .Values.runtime.requiredProvider }}
{{- $_ := set $runtime "required_provider" .Values.runtime.requiredProvider }}
{{- end }}
{{- $cpus := dig "limits" "cpu" (dig "requests" "cpu" "" .Values.resources) .Values.resources }}
{{- if gt (int .Values.runtime.sharedThreads) 0 }}
{{- $_ := set $runtime "shared_threads" (int .Values.runtime.sharedThreads) }}
{{- else if $cpus }}
{{- $_ := set $runtime "shared_threads" (include "lmserve.wholeCpus" $cpus | int) }}
{{- end }}
{{- $config := dict
    "server" $server
    "runtime" $runtime
    "repository" (dict "path" .Values.models.mountPath "poll_interval_ms" (int .Values.models.pollIntervalMs))
    "state" (dict "path" (printf "%s/state.json" (include "lmserve.stateDir" .)))
    "logging" (dict "format" .Values.server.logFormat "filter" .Values.server.logFilter) -}}
{{- if .Values.tls.enabled }}
{{- $tls := dict "cert_file" "/etc/lmserve/tls/tls.crt" "key_file" "/etc/lmserve/tls/tls.key" }}
{{- if .Values.tls.mutual }}
{{- $_ := set $tls "client_ca_file" "/etc/lmserve/tls/ca.crt" }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- $_ := set $config "auth" (dict "keys_file" "/etc/lmserve/auth/keys") }}
{{- end }}
{{- if .Values.routes }}
{{- $_ := set $config "routes" (deepCopy .Values.routes) }}
{{- end }}
{{- /* YAML numbers reach templates as floats, which toToml writes as "16.0"; the server's
       integer settings refuse those, and its float settings take "16" as well. */}}
{{- $merged := mergeOverwrite $config (deepCopy .Values.config) }}
{{- if .omitRoutes }}
{{- $_ := unset $merged "routes" }}
{{- end }}
{{- regexReplaceAll "(?m)= (-?[0-9]+)\\.0$" (toToml $merged) "= ${1}" }}
{{- end }}

{{/*
A CPU quantity ("2", 2, "1.5", "500m") in whole CPUs, rounded up, at least 1.
*/}}
{{- define "lmserve.wholeCpus" -}}
{{- $cpu := toString . -}}
{{- $cores := 0.0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = divf (float64 (trimSuffix "m" $cpu)) 1000 -}}
{{- else -}}
{{- $cores = float64 $cpu -}}
{{- end -}}
{{- max 1 (int (ceil $cores)) -}}
{{- end -}}
