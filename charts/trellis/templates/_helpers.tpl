{{- /*
Every object's labels; `meshctl install` writes the same ones (with
managed-by meshctl). Call with (list $ "component").
*/ -}}
{{- define "trellis.labels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $.Chart.Name $.Chart.Version }}
{{- end }}

{{- /* The controller pods' labels, which its Services and PDB select. */ -}}
{{- define "trellis.controllerSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- /* repository:tag of an image value; the tag defaults to appVersion. */ -}}
{{- define "trellis.image" -}}
{{- $ := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s:%s" $image.repository ($image.tag | default $.Chart.AppVersion) -}}
{{- end }}

{{- /*
The injector's configuration (ConfigMap trellis-inject, config.yaml). Its
sha256 rolls the controller when it changes, so the exact text matters:
`meshctl install` writes the same bytes.
*/ -}}
{{- define "trellis.injectConfig" -}}
proxyImage: {{ include "trellis.image" (list . .Values.proxy.image) | toJson }}
imagePullPolicy: {{ .Values.proxy.image.pullPolicy | toJson }}
controllerAddress: {{ printf "https://trellis-controller.%s.svc:8090" .Release.Namespace | toJson }}
proxyUid: {{ .Values.proxy.uid | int64 }}
inboundMode: {{ .Values.proxy.inboundMode | toJson }}
logLevel: {{ .Values.proxy.logLevel | toJson }}
resources: {{ .Values.proxy.resources | toJson }}
{{ end }}

{{- define "trellis.requiredTrustRoots" -}}
{{- required "identity.trustRoots (the mesh's root CA PEM) is required: `meshctl install` generates it, or pass --set-file identity.trustRoots=ca-bundle.crt (and identity.issuer.certificate/key) to helm install" .Values.identity.trustRoots -}}
{{- end }}
