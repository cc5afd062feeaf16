//! The chart's objects, built from the values as its templates build them
//! (charts/trellis/templates; tests/tests/chart.rs keeps the two equal by
//! installing the chart with Helm against the fake API server). The CRDs
//! and dashboards are the chart's own files, embedded.

use serde_json::{json, Value};

use super::values::{Image, Values};

const CHART: &str = include_str!("../../../charts/trellis/Chart.yaml");
const CRDS: [&str; 4] = [
    include_str!("../../../charts/trellis/files/crds/authorizationpolicies.trellis.dev.yaml"),
    include_str!("../../../charts/trellis/files/crds/httpfaults.trellis.dev.yaml"),
    include_str!("../../../charts/trellis/files/crds/resiliencepolicies.trellis.dev.yaml"),
    include_str!("../../../charts/trellis/files/crds/rollouts.trellis.dev.yaml"),
];
/// `(name, JSON)` of each dashboard, in the order Helm's `Files.Glob` gives.
const DASHBOARDS: [(&str, &str); 4] = [
    (
        "canary",
        include_str!("../../../charts/trellis/dashboards/canary.json"),
    ),
    (
        "control-plane",
        include_str!("../../../charts/trellis/dashboards/control-plane.json"),
    ),
    (
        "mesh-overview",
        include_str!("../../../charts/trellis/dashboards/mesh-overview.json"),
    ),
    (
        "service-detail",
        include_str!("../../../charts/trellis/dashboards/service-detail.json"),
    ),
];

/// Helm's release name for the same objects.
const RELEASE: &str = "trellis";
const CONTROLLER: &str = "trellis-controller";
const ISSUER_SECRET: &str = "trellis-identity-issuer";
const TRUST_ROOTS: &str = "trellis-identity-trust-roots";
const INJECT_CONFIG: &str = "trellis-inject";

/// Name, version and appVersion of the chart.
struct Chart {
    name: String,
    version: String,
    app_version: String,
}

impl Chart {
    fn embedded() -> Self {
        let chart: Value = serde_saphyr::from_str(CHART).expect("the embedded Chart.yaml is YAML");
        let field = |key: &str| chart[key].as_str().unwrap_or_default().to_string();
        Chart {
            name: field("name"),
            version: field("version"),
            app_version: field("appVersion"),
        }
    }

    fn label(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }

    fn image(&self, image: &Image) -> String {
        let tag = if image.tag.is_empty() {
            &self.app_version
        } else {
            &image.tag
        };
        format!("{}:{tag}", image.repository)
    }
}

/// Every object, in apply order: the namespace, the CRDs, then the rest.
pub fn objects(values: &Values, namespace: &str) -> Vec<Value> {
    let chart = Chart::embedded();
    let render = Render {
        values,
        namespace,
        chart: &chart,
    };
    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace, "labels": render.labels("namespace")},
    })];
    objects.extend(
        CRDS.iter()
            .map(|crd| serde_saphyr::from_str::<Value>(crd).expect("the embedded CRDs are YAML")),
    );
    objects.extend(render.identity());
    objects.extend(render.rbac());
    objects.extend(render.controller());
    objects.extend(render.services());
    objects.push(render.webhook());
    objects.extend(render.monitors());
    objects.extend(render.dashboards());
    objects
}

struct Render<'a> {
    values: &'a Values,
    namespace: &'a str,
    chart: &'a Chart,
}

impl Render<'_> {
    fn labels(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": self.chart.name,
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/version": self.chart.app_version,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "meshctl",
            "helm.sh/chart": self.chart.label(),
        })
    }

    fn controller_selector(&self) -> Value {
        json!({
            "app.kubernetes.io/name": self.chart.name,
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "controller",
        })
    }

    /// Metadata of a namespaced object.
    fn metadata(&self, name: &str, component: &str) -> Value {
        json!({"name": name, "namespace": self.namespace, "labels": self.labels(component)})
    }

    /// The injector's config.yaml, byte for byte as the chart's
    /// `trellis.injectConfig` writes it (its sha256 is a pod annotation).
    fn inject_config(&self) -> String {
        let proxy = &self.values.proxy;
        format!(
            "proxyImage: {}\nimagePullPolicy: {}\ncontrollerAddress: {}\nproxyUid: {}\n\
             inboundMode: {}\nlogLevel: {}\nresources: {}\n",
            to_json(&self.chart.image(&proxy.image)),
            to_json(&proxy.image.pull_policy),
            to_json(&format!(
                "https://trellis-controller.{}.svc:8090",
                self.namespace
            )),
            proxy.uid,
            to_json(&proxy.inbound_mode),
            to_json(&proxy.log_level),
            to_json(&proxy.resources),
        )
    }

    fn identity(&self) -> Vec<Value> {
        let identity = &self.values.identity;
        let mut objects = Vec::new();
        if !identity.issuer.external {
            objects.push(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": self.metadata(ISSUER_SECRET, "identity"),
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": base64(&identity.issuer.certificate),
                    "tls.key": base64(&identity.issuer.key),
                },
            }));
        }
        objects.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": self.metadata(TRUST_ROOTS, "identity"),
            "data": {"ca-bundle.crt": identity.trust_roots},
        }));
        objects.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": self.metadata(INJECT_CONFIG, "injector"),
            "data": {"config.yaml": self.inject_config()},
        }));
        objects
    }

    fn rbac(&self) -> Vec<Value> {
        let labels = self.labels("controller");
        let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| json!({"apiGroups": groups, "resources": resources, "verbs": verbs});
        let named = |groups: &[&str], resources: &[&str], name: &str, verbs: &[&str]| json!({"apiGroups": groups, "resources": resources, "resourceNames": [name], "verbs": verbs});
        let list_watch = ["list", "watch"];
        let subjects =
            json!([{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": self.namespace}]);
        let role_ref = |kind: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": CONTROLLER});
        vec![
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": self.metadata(CONTROLLER, "controller"),
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": CONTROLLER, "labels": labels},
                "rules": [
                    rule(&[""], &["namespaces", "services", "pods"], &list_watch),
                    rule(&["discovery.k8s.io"], &["endpointslices"], &list_watch),
                    rule(&["gateway.networking.k8s.io"], &["httproutes", "grpcroutes"], &list_watch),
                    rule(&["trellis.dev"], &["httpfaults", "resiliencepolicies", "rollouts", "authorizationpolicies"], &list_watch),
                    rule(&["trellis.dev"], &["rollouts/status"], &["patch"]),
                    rule(&["gateway.networking.k8s.io"], &["httproutes"], &["create", "patch"]),
                    rule(&["gateway.networking.k8s.io"], &["httproutes/status", "grpcroutes/status"], &["patch"]),
                    rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                ],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": CONTROLLER, "labels": labels},
                "roleRef": role_ref("ClusterRole"),
                "subjects": subjects,
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": self.metadata(CONTROLLER, "controller"),
                "rules": [
                    rule(&["coordination.k8s.io"], &["leases"], &["create"]),
                    named(&["coordination.k8s.io"], &["leases"], CONTROLLER, &["get", "update"]),
                    named(&[""], &["secrets"], ISSUER_SECRET, &["get", "list", "watch"]),
                    named(&[""], &["configmaps"], TRUST_ROOTS, &["get", "list", "watch"]),
                ],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": self.metadata(CONTROLLER, "controller"),
                "roleRef": role_ref("Role"),
                "subjects": subjects,
            }),
        ]
    }

    fn controller(&self) -> Vec<Value> {
        let controller = &self.values.controller;
        let probe = |path: &str, period: u32| json!({"httpGet": {"path": path, "port": "admin"}, "periodSeconds": period});
        let mut startup = probe("/ready", 2);
        startup["failureThreshold"] = json!(60);
        let mut args = vec![
            "--source=cluster".to_string(),
            format!("--namespace={}", self.namespace),
            format!("--service-account={CONTROLLER}"),
            "--listen=0.0.0.0:8090".into(),
            "--admin=0.0.0.0:9990".into(),
            "--webhook-listen=0.0.0.0:8443".into(),
            "--inject-config=/etc/trellis/inject/config.yaml".into(),
            "--state-dir=/var/run/trellis".into(),
            format!("--trust-domain={}", self.values.trust_domain),
        ];
        if !controller.prometheus_url.is_empty() {
            args.push(format!("--prometheus-url={}", controller.prometheus_url));
        }
        let container = json!({
            "name": "controller",
            "image": self.chart.image(&controller.image),
            "imagePullPolicy": controller.image.pull_policy,
            "args": args,
            "env": [{"name": "RUST_LOG", "value": controller.log_level}],
            "ports": [
                {"name": "grpc", "containerPort": 8090},
                {"name": "webhook", "containerPort": 8443},
                {"name": "admin", "containerPort": 9990},
            ],
            "startupProbe": startup,
            "readinessProbe": probe("/ready", 5),
            "livenessProbe": probe("/live", 10),
            "resources": controller.resources,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "state", "mountPath": "/var/run/trellis"},
                {"name": "inject-config", "mountPath": "/etc/trellis/inject", "readOnly": true},
            ],
        });
        let selector = self.controller_selector();
        vec![
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": self.metadata(CONTROLLER, "controller"),
                "spec": {
                    "replicas": controller.replicas,
                    "selector": {"matchLabels": selector},
                    "template": {
                        "metadata": {
                            "labels": selector,
                            "annotations": {"checksum/inject-config": sha256_hex(&self.inject_config())},
                        },
                        "spec": {
                            "serviceAccountName": CONTROLLER,
                            "securityContext": {
                                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": selector},
                                },
                            }]}},
                            "containers": [container],
                            "volumes": [
                                {"name": "state", "emptyDir": {}},
                                {"name": "inject-config", "configMap": {"name": INJECT_CONFIG}},
                            ],
                        },
                    },
                },
            }),
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": self.metadata(CONTROLLER, "controller"),
                "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}},
            }),
        ]
    }

    fn services(&self) -> Vec<Value> {
        [
            (CONTROLLER, "grpc", 8090, "grpc"),
            ("trellis-webhook", "https", 443, "webhook"),
            ("trellis-controller-metrics", "admin", 9990, "admin"),
        ]
        .into_iter()
        .map(|(name, port_name, port, target)| {
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": self.metadata(name, "controller"),
                "spec": {
                    "selector": self.controller_selector(),
                    "ports": [{"name": port_name, "port": port, "targetPort": target}],
                },
            })
        })
        .collect()
    }

    fn webhook(&self) -> Value {
        let webhook = &self.values.webhook;
        let excluded = [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            self.namespace,
        ];
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "trellis-proxy-injector", "labels": self.labels("injector")},
            "webhooks": [{
                "name": "inject.trellis.dev",
                "clientConfig": {
                    "service": {
                        "name": "trellis-webhook", "namespace": self.namespace,
                        "path": "/inject", "port": 443,
                    },
                    "caBundle": base64(&self.values.identity.trust_roots),
                },
                "rules": [{
                    "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "scope": "Namespaced",
                }],
                "namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
                    {"key": "trellis.dev/inject", "operator": "NotIn", "values": ["disabled"]},
                ]},
                "failurePolicy": webhook.failure_policy,
                "timeoutSeconds": webhook.timeout_seconds,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "IfNeeded",
            }],
        })
    }

    fn monitors(&self) -> Vec<Value> {
        let monitoring = &self.values.monitoring;
        let labels = |component: &str, extra: &std::collections::BTreeMap<String, String>| {
            let mut labels = self.labels(component);
            for (key, value) in extra {
                labels[key] = json!(value);
            }
            labels
        };
        let mut objects = Vec::new();
        let pods = &monitoring.pod_monitor;
        if pods.enabled {
            let mut metadata = self.metadata("trellis-proxies", "proxy");
            metadata["labels"] = labels("proxy", &pods.labels);
            objects.push(json!({
                "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                "metadata": metadata,
                "spec": {
                    "namespaceSelector": {"any": true},
                    "selector": {},
                    "podMetricsEndpoints": [{
                        "path": "/metrics",
                        "interval": pods.interval,
                        "relabelings": [{
                            "sourceLabels": ["__meta_kubernetes_pod_container_name", "__meta_kubernetes_pod_container_port_number"],
                            "regex": "trellis-proxy;4191",
                            "action": "keep",
                        }],
                    }],
                },
            }));
        }
        let services = &monitoring.service_monitor;
        if services.enabled {
            let mut metadata = self.metadata(CONTROLLER, "controller");
            metadata["labels"] = labels("controller", &services.labels);
            objects.push(json!({
                "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                "metadata": metadata,
                "spec": {
                    "selector": {"matchLabels": self.controller_selector()},
                    // The rollout metrics' own `namespace` label (the
                    // rollout's) wins over the target's (the controller's).
                    "endpoints": [{"port": "admin", "path": "/metrics", "interval": services.interval, "honorLabels": true}],
                },
            }));
        }
        objects
    }

    fn dashboards(&self) -> Vec<Value> {
        DASHBOARDS
            .iter()
            .map(|(name, dashboard)| {
                json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {
                        "name": format!("{RELEASE}-dashboard-{name}"),
                        "namespace": self.namespace,
                        "labels": {
                            "grafana_dashboard": "1",
                            "app.kubernetes.io/name": self.chart.name,
                            "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/managed-by": "meshctl",
                            "app.kubernetes.io/component": "dashboards",
                            "helm.sh/chart": self.chart.label(),
                        },
                    },
                    // The template's `|-` block drops the final newline.
                    "data": {format!("{name}.json"): dashboard.trim_end_matches('\n')},
                })
            })
            .collect()
    }
}

/// `value` as the chart's `toJson` writes it: map keys sorted, as Go
/// writes them (the workspace's serde_json keeps insertion order).
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    fn sorted(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    let value = serde_json::to_value(value).expect("values serialize");
    serde_json::to_string(&sorted(value)).expect("values serialize")
}

fn base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
