{{/* Names, labels and the pieces several templates share. */}}

{{- define "meshguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "meshguard.fullname" -}}
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

{{- define "meshguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The server's pods: what its Services, disruption budget and anti-affinity select. The component keeps the
chart's other pods (the audit Job's, the test's) out; the Deployment's own selector, which cannot change on an
upgrade, stays the one above. */}}
{{- define "meshguard.serverLabels" -}}
{{ include "meshguard.selectorLabels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{- define "meshguard.labels" -}}
helm.sh/chart: {{ include "meshguard.chart" . }}
{{ include "meshguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshguard
{{- end }}

{{- define "meshguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the serving certificate (every mode but url). */}}
{{- define "meshguard.tlsSecretName" -}}
{{- printf "%s-tls" (include "meshguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The mesh CA's Secret and ClusterTrustBundle, when the server signs workload certificates. */}}
{{- define "meshguard.caSecretName" -}}
{{- printf "%s-mesh-ca" (include "meshguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "meshguard.trustBundleName" -}}
{{- printf "%s:mesh-ca" (replace "/" ":" .Values.identity.signerName) }}
{{- end }}
{{/* Whether meshguard issues workload certificates (with the mesh CA): all modes but static. */}}
{{- define "meshguard.identity" -}}
{{- if ne .Values.identity.mode "static" }}true{{ end }}
{{- end }}
{{/* Whether it may sign Pod Certificates: mode pod-certificate, or auto. */}}
{{- define "meshguard.signer" -}}
{{- if has .Values.identity.mode (list "auto" "pod-certificate") }}true{{ end }}
{{- end }}
{{/* Whether the server will sign Pod Certificates: mode pod-certificate, or auto where the cluster serves them
     (PodCertificateRequests and ClusterTrustBundles both, in either version, as the server checks). */}}
{{- define "meshguard.podCertificates" -}}
{{- $found := dict }}
{{- range $kind := list "PodCertificateRequest" "ClusterTrustBundle" }}
{{- range $version := list "v1" "v1beta1" }}
{{- if $.Capabilities.APIVersions.Has (printf "certificates.k8s.io/%s/%s" $version $kind) }}
{{- $_ := set $found $kind true }}
{{- end }}
{{- end }}
{{- end }}
{{- $served := eq (len $found) 2 }}
{{- if or (eq .Values.identity.mode "pod-certificate") (and (eq .Values.identity.mode "auto") $served) }}true{{ end }}
{{- end }}
{{/* Whether it may keep a certificate Secret per ServiceAccount: mode secret, or auto where the cluster does not
     serve Pod Certificates (the signer's rules stay, for when the cluster is upgraded). */}}
{{- define "meshguard.accountSecrets" -}}
{{- if or (eq .Values.identity.mode "secret") (and (eq .Values.identity.mode "auto") (not (include "meshguard.podCertificates" .))) }}true{{ end }}
{{- end }}

{{/* Whether the server runs in this cluster (false when webhooks.url points elsewhere). */}}
{{- define "meshguard.inCluster" -}}
{{- if not .Values.webhooks.url }}true{{ end }}
{{- end }}

{{- define "meshguard.certDir" -}}/etc/meshguard/certs{{- end }}
{{- define "meshguard.clientCADir" -}}/etc/meshguard/client-ca{{- end }}

{{/* The tls section: the serving pair's directory, and the client CA file when clientCA names a ConfigMap. */}}
{{- define "meshguard.tlsConfig" -}}
cert_dir: {{ include "meshguard.certDir" . }}
{{- with .Values.clientCA.configMap }}
client_ca_file: {{ printf "%s/%s" (include "meshguard.clientCADir" $) $.Values.clientCA.key }}
{{- end }}
{{- end }}

{{/*
The server's config.yaml: the chart's defaults with .Values.config merged over them (values win), as YAML.
The ports, cert dir and failure modes here are what the Deployment, probes and webhooks are rendered from.
*/}}
{{- define "meshguard.config" -}}
{{- $defaults := dict
  "log_level" "info"
  "server" (dict "port" 8443 "health_port" 8080 "shutdown_delay_seconds" 5)
  "tls" (include "meshguard.tlsConfig" . | fromYaml)
  "failure" (dict
    "mutate" (ternary "deny" "allow" (eq .Values.webhooks.injection.failurePolicy "Fail"))
    "validate" (ternary "deny" "allow" (eq .Values.webhooks.validation.failurePolicy "Fail")))
  "injection" (dict "init_image" (include "meshguard.image" .))
  "identity" (dict "mode" .Values.identity.mode "signer_name" .Values.identity.signerName
                   "ca_secret" (include "meshguard.caSecretName" .))
  "xds" (dict "enabled" .Values.controlPlane.enabled "port" .Values.controlPlane.port)
}}
{{- with .Values.webhooks.excludeNamespaces }}
{{- /* Never sent to the webhooks, so neither judged by `meshguard audit` nor injected. */}}
{{- $_ := set $defaults "policy" (dict "exempt" (dict "namespaces" .)) }}
{{- $_ := set $defaults.injection "exclude_namespaces" . }}
{{- end }}
{{- $xds := include "meshguard.xdsAddress" . }}
{{- if $xds }}
{{- $_ := set $defaults.injection "xds_address" $xds }}
{{- end }}
{{- if eq .Values.certificates.mode "selfManaged" }}
{{- $sm := .Values.certificates.selfManaged }}
{{- $_ := set $defaults "certificates" (dict
  "self_managed" true
  "secret_name" (include "meshguard.tlsSecretName" .)
  "service" (include "meshguard.fullname" .)
  "mutating_webhook" (include "meshguard.fullname" .)
  "validating_webhook" (include "meshguard.fullname" .)
  "validity_days" $sm.validityDays
  "renew_before_days" $sm.renewBeforeDays
  "check_interval_seconds" $sm.checkIntervalSeconds) }}
{{- end }}
{{- /* Settings the chart renders other objects from (RBAC, Secrets, ports, the proxies' xDS address): set
     through `config` they would disagree with those objects, so they come only from their values. */}}
{{- $owned := list (list "xds" "enabled" "controlPlane.enabled") (list "xds" "port" "controlPlane.port")
  (list "injection" "xds_address" "controlPlane.address") (list "identity" "mode" "identity.mode")
  (list "identity" "signer_name" "identity.signerName") (list "identity" "ca_secret" "identity (the chart names it)")
  (list "certificates" "self_managed" "certificates.mode") (list "certificates" "secret_name" "certificates.mode") }}
{{- range $owned }}
{{- if hasKey (index $.Values.config (index . 0) | default dict) (index . 1) }}
{{- fail (printf "config.%s.%s is set by the chart from %s; set that value instead" (index . 0) (index . 1) (index . 2)) }}
{{- end }}
{{- end }}
{{- toYaml (mustMergeOverwrite $defaults (deepCopy .Values.config)) }}
{{- end }}

{{/* One webhook's clientConfig: the in-cluster Service, or webhooks.url with its caBundle. */}}
{{- define "meshguard.clientConfig" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- $caBundle := index . 2 }}
{{- if $root.Values.webhooks.url }}
url: {{ printf "%s%s" (trimSuffix "/" $root.Values.webhooks.url) $path | quote }}
caBundle: {{ required "webhooks.caBundle is required with webhooks.url" $root.Values.webhooks.caBundle }}
{{- else }}
service:
  name: {{ include "meshguard.fullname" $root }}
  namespace: {{ $root.Release.Namespace }}
  path: {{ $path }}
  port: {{ $root.Values.service.port }}
{{- with $caBundle }}
caBundle: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Namespaces no webhook is ever called for: the control plane's, meshguard's own, and the listed ones. */}}
{{- define "meshguard.namespaceExclusion" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values:
    {{- toYaml (uniq (concat (list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace) .Values.webhooks.excludeNamespaces)) | nindent 4 }}
{{- end }}

{{/* Where the proxies dial the control plane: controlPlane.address, else the in-cluster Service; empty when the
control plane is off or runs outside the cluster without an address. */}}
{{- define "meshguard.xdsAddress" -}}
{{- if .Values.controlPlane.enabled }}
{{- if .Values.controlPlane.address }}
{{- .Values.controlPlane.address }}
{{- else if include "meshguard.inCluster" . }}
{{- printf "%s.%s.svc:%d" (include "meshguard.fullname" .) .Release.Namespace (int .Values.controlPlane.port) }}
{{- end }}
{{- end }}
{{- end }}
