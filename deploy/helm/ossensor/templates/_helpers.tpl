{{- define "ossensor.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ossensor.labels" -}}
app.kubernetes.io/part-of: ossensor
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "ossensor.secretName" -}}
{{ .Values.hmac.existingSecret | default (printf "%s-hmac" .Release.Name) }}
{{- end -}}

{{- define "ossensor.vsensorHost" -}}
{{- if .Values.sensor.env.VSENSOR_HOSTNAME -}}
{{ .Values.sensor.env.VSENSOR_HOSTNAME }}
{{- else if .Values.vsensor.enabled -}}
{{ .Release.Name }}-vsensor.{{ .Release.Namespace }}.svc.cluster.local
{{- else -}}
{{ fail "sensor.env.VSENSOR_HOSTNAME is required when vsensor.enabled is false" }}
{{- end -}}
{{- end -}}

{{- define "ossensor.natsUrls" -}}
{{- if .Values.cluster.nats -}}
{{ join "," .Values.cluster.nats }}
{{- else -}}
nats://nats.{{ .Release.Namespace }}.svc.{{ .Values.cluster.clusterDomain }}:4222
{{- end -}}
{{- end -}}

{{- /* Pod anti-affinity for the pods of one component, by cluster.antiAffinity. */}}
{{- define "ossensor.antiAffinity" -}}
{{- $terms := dict "topologyKey" "kubernetes.io/hostname"
      "labelSelector" (dict "matchLabels" .labels) -}}
podAntiAffinity:
{{- if eq .root.Values.cluster.antiAffinity "required" }}
  requiredDuringSchedulingIgnoredDuringExecution:
    - {{- toYaml $terms | nindent 6 }}
{{- else if eq .root.Values.cluster.antiAffinity "preferred" }}
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        {{- toYaml $terms | nindent 8 }}
{{- else }}
{{- fail "cluster.antiAffinity must be preferred or required" }}
{{- end }}
{{- end -}}
