{{/* The chart name, overridable with nameOverride. */}}
{{- define "pbx-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name when it already contains the chart name. */}}
{{- define "pbx-operator.fullname" -}}
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

{{- define "pbx-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pbx-operator.labels" -}}
helm.sh/chart: {{ include "pbx-operator.chart" . }}
{{ include "pbx-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pbx-operator
{{- end }}

{{- define "pbx-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pbx-operator.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "pbx-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pbx-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Whether the operator runs with --leader-election: by value, and always with more than one replica. */}}
{{- define "pbx-operator.leaderElection" -}}
{{- $standby := false }}
{{- range .Values.shards }}{{ if gt (int (default $.Values.replicas .replicas)) 1 }}{{ $standby = true }}{{ end }}{{ end }}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) $standby }}true{{ end }}
{{- end }}

{{/* The operator's user name as the API server sees it (request.userInfo.username). */}}
{{- define "pbx-operator.username" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "pbx-operator.serviceAccountName" . }}
{{- end }}

{{- define "pbx-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The five kinds, as plural resource names. */}}
{{- define "pbx-operator.allKinds" -}}
- pbxconnections
- bulkuserchanges
- bulkphonechanges
- phonerestarts
- userrecycles
{{- end }}

{{/* The kinds that execute work on the PBX: each has a virtual `<plural>/execute` subresource. */}}
{{- define "pbx-operator.executingKinds" -}}
- bulkuserchanges
- bulkphonechanges
- phonerestarts
- userrecycles
{{- end }}

{{/* The kinds that may do destructive work: each has a virtual `<plural>/destructive` subresource. */}}
{{- define "pbx-operator.destructiveKinds" -}}
- bulkuserchanges
- userrecycles
{{- end }}

{{/* The namespace a scheduled restart's objects live in. */}}
{{- define "pbx-operator.restartNamespace" -}}
{{- $root := index . 0 }}{{ $r := index . 1 }}
{{- $r.namespace | default $root.Values.watchNamespace | default $root.Release.Namespace | toString }}
{{- end }}

{{/*
The API group of the virtual `<plural>/execute` and `<plural>/destructive` permissions. Not
pbx-operator.io: RBAC's resources ["*"] matches every subresource of its group, so a broad role
written as `apiGroups: [pbx-operator.io], resources: ["*"]` would grant executing by accident.
In a group of their own they are granted only by rules that name them (or by apiGroups ["*"]).
*/}}
{{- define "pbx-operator.permissionGroup" -}}
permissions.pbx-operator.io
{{- end }}

{{/* A list of strings as the elements of a CEL list literal: 'a', 'b'. */}}
{{- define "pbx-operator.celStrings" -}}
{{- $out := list }}
{{- range . }}
{{- $out = append $out (printf "'%s'" (toString . | replace "\\" "\\\\" | replace "'" "\\'")) }}
{{- end }}
{{- join ", " $out }}
{{- end }}
