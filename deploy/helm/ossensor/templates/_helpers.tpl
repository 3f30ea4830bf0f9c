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
