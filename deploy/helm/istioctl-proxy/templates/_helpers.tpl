{{/* Names and labels. */}}
{{- define "istioctl-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "istioctl-proxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "istioctl-proxy.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "istioctl-proxy.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "istioctl-proxy.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* Labels on the pods and used by selectors: must never change across upgrades. */}}
{{- define "istioctl-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "istioctl-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "istioctl-proxy.labels" -}}
{{ include "istioctl-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: istio
{{- if not .Values.plainManifest }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}
{{- end -}}

{{- define "istioctl-proxy.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "istioctl-proxy.identity" -}}
{{- eq .Values.auth.mode "identity" -}}
{{- end -}}

{{/* Combinations the proxy would refuse at start (or that would expose more than asked): fail the render
with the reason instead of shipping a pod that crash-loops or leaks. */}}
{{- define "istioctl-proxy.validate" -}}
{{- $identity := eq .Values.auth.mode "identity" -}}
{{- if and $identity .Values.tls.plaintext }}
{{- fail "auth.mode=identity authenticates callers by TLS client certificate: it cannot run with tls.plaintext=true" }}
{{- end }}
{{- if not (or .Values.istiod.plaintext .Values.istiod.caFromConfigMap .Values.istiod.caFile) }}
{{- fail "istiod.caFromConfigMap=false needs istiod.caFile (the istio root CA, mounted with extraVolumes): without it the proxy cannot verify istiod" }}
{{- end }}
{{- if and .Values.istiod.plaintext (not $identity) (not .Values.auth.insecureForwardTokens) }}
{{- fail "istiod.plaintext=true in forward mode sends every caller's token to istiod unencrypted: use TLS to istiod, auth.mode=identity, or set auth.insecureForwardTokens=true to accept it" }}
{{- end }}
{{- if and .Values.admin.statusPageRemote (not .Values.admin.statusPage) }}
{{- fail "admin.statusPageRemote widens admin.statusPage, which is false" }}
{{- end }}
{{- if and .Values.admin.statusPageRemote (not (and .Values.networkPolicy.enabled .Values.networkPolicy.adminFrom)) }}
{{- fail "admin.statusPageRemote=true shows the whole mesh to whoever reaches the admin port: set networkPolicy.adminFrom (with networkPolicy.enabled) to the peers allowed, or leave it false and use kubectl port-forward" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (gt (int .Values.replicas) 1) (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicas)) }}
{{- fail (printf "podDisruptionBudget.minAvailable=%v with replicas=%v would block every node drain: use fewer than replicas" .Values.podDisruptionBudget.minAvailable .Values.replicas) }}
{{- end }}
{{- end -}}
