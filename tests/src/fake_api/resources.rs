//! The resources the fake API server knows, and the documents that describe
//! them: legacy discovery (`/api`, `/apis`, group versions), `/version` and a
//! minimal OpenAPI v3.

use serde_json::{json, Value};

/// One REST resource (`services`, `httproutes`, ...).
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `/status` subresource.
    pub status: bool,
    /// Only `create` (TokenReview); otherwise every verb this server serves.
    pub create_only: bool,
}

const ALL_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const GATEWAY: &str = "gateway.networking.k8s.io";
const TRELLIS: &str = "trellis.dev";
const MONITORING: &str = "monitoring.coreos.com";
const RBAC: &str = "rbac.authorization.k8s.io";

/// A namespaced resource with every verb; the methods below change that.
const fn resource(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
) -> Resource {
    Resource {
        group,
        version,
        plural,
        kind,
        namespaced: true,
        short_names: &[],
        categories: &[],
        status: false,
        create_only: false,
    }
}

impl Resource {
    const fn cluster_scoped(self) -> Self {
        Resource {
            namespaced: false,
            ..self
        }
    }

    const fn short(self, short_names: &'static [&'static str]) -> Self {
        Resource {
            short_names,
            ..self
        }
    }

    /// In the `all` category (`kubectl get all`).
    const fn in_all(self) -> Self {
        Resource {
            categories: &["all"],
            ..self
        }
    }

    const fn with_status(self) -> Self {
        Resource {
            status: true,
            ..self
        }
    }

    const fn create_only(self) -> Self {
        Resource {
            create_only: true,
            ..self
        }
    }
}

pub static RESOURCES: &[Resource] = &[
    resource("", "v1", "namespaces", "Namespace")
        .cluster_scoped()
        .short(&["ns"])
        .with_status(),
    resource("", "v1", "services", "Service")
        .short(&["svc"])
        .in_all()
        .with_status(),
    resource("", "v1", "pods", "Pod")
        .short(&["po"])
        .in_all()
        .with_status(),
    resource("", "v1", "secrets", "Secret"),
    resource("", "v1", "configmaps", "ConfigMap").short(&["cm"]),
    resource("", "v1", "serviceaccounts", "ServiceAccount").short(&["sa"]),
    resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    resource(GATEWAY, "v1", "httproutes", "HTTPRoute").with_status(),
    resource(GATEWAY, "v1", "grpcroutes", "GRPCRoute").with_status(),
    resource(TRELLIS, "v1alpha1", "httpfaults", "HTTPFault").with_status(),
    resource(
        TRELLIS,
        "v1alpha1",
        "resiliencepolicies",
        "ResiliencePolicy",
    )
    .with_status(),
    resource(TRELLIS, "v1alpha1", "rollouts", "Rollout").with_status(),
    resource(
        TRELLIS,
        "v1alpha1",
        "authorizationpolicies",
        "AuthorizationPolicy",
    ),
    resource("coordination.k8s.io", "v1", "leases", "Lease"),
    resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview")
        .cluster_scoped()
        .create_only(),
    resource(
        "authorization.k8s.io",
        "v1",
        "subjectaccessreviews",
        "SubjectAccessReview",
    )
    .cluster_scoped()
    .create_only(),
    // What the Helm chart installs.
    resource("apps", "v1", "deployments", "Deployment")
        .short(&["deploy"])
        .in_all()
        .with_status(),
    resource(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
    )
    .short(&["pdb"])
    .with_status(),
    resource(RBAC, "v1", "clusterroles", "ClusterRole").cluster_scoped(),
    resource(RBAC, "v1", "clusterrolebindings", "ClusterRoleBinding").cluster_scoped(),
    resource(RBAC, "v1", "roles", "Role"),
    resource(RBAC, "v1", "rolebindings", "RoleBinding"),
    resource(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
    )
    .cluster_scoped(),
    resource(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
    )
    .cluster_scoped()
    .short(&["crd", "crds"])
    .with_status(),
    resource(MONITORING, "v1", "podmonitors", "PodMonitor"),
    resource(MONITORING, "v1", "servicemonitors", "ServiceMonitor"),
];

impl Resource {
    pub fn api_version(&self) -> String {
        group_version(self.group, self.version)
    }

    /// `services` or `httproutes.gateway.networking.k8s.io`, as Status
    /// messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Served from a CustomResourceDefinition in a real cluster (so no
    /// strategic merge patch).
    pub fn custom(&self) -> bool {
        matches!(self.group, TRELLIS | GATEWAY | MONITORING)
    }

    pub fn by_path(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
    }

    /// The collection path, as in OpenAPI paths.
    fn item_path(&self) -> String {
        let prefix = if self.group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        if self.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", self.plural)
        } else {
            format!("{prefix}/{}/{{name}}", self.plural)
        }
    }
}

pub fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// The API groups other than core, each with its versions, in table order.
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => groups.push((r.group, vec![r.version])),
        }
    }
    groups
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-trellis-fake",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": group_version(group, v), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "preferredVersion": versions[0], "versions": versions
    })
}

pub fn group_list() -> Value {
    let groups: Vec<Value> = groups()
        .iter()
        .map(|(group, versions)| {
            let mut group = api_group(group, versions);
            let object = group.as_object_mut().expect("an object");
            object.remove("kind");
            object.remove("apiVersion");
            group
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if the group exists.
pub fn group(name: &str) -> Option<Value> {
    groups()
        .into_iter()
        .find(|(group, _)| *group == name)
        .map(|(group, versions)| api_group(group, &versions))
}

/// `/api/v1` or `/apis/<group>/<version>`, if that group version exists.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let verbs: &[&str] = if r.create_only {
            &["create"]
        } else {
            ALL_VERBS
        };
        resources.push(json!({
            "name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs, "shortNames": r.short_names,
            "categories": r.categories,
        }));
        if r.status {
            resources.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    (!resources.is_empty()).then(|| {
        json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": group_version(group, version), "resources": resources
        })
    })
}

/// `/openapi/v3`: one path per group version.
pub fn openapi_root() -> Value {
    let mut paths = serde_json::Map::new();
    let core = std::iter::once(("", vec!["v1"]));
    for (group, versions) in core.chain(groups()) {
        for version in versions {
            let path = if group.is_empty() {
                "api/v1".to_string()
            } else {
                format!("apis/{group}/{version}")
            };
            let url = json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=trellis-fake")});
            paths.insert(path, url);
        }
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<api|apis/group>/<version>`: a minimal document that says,
/// per kind, that PATCH takes the `fieldValidation` parameter. That is what
/// kubectl's `--validate=strict` (the default) looks for to leave validation
/// to the server; without it, kubectl wants the full schemas. It carries no
/// request body types, so kubectl computes strategic merge patches from its
/// built-in types and merge patches for the custom kinds, as it does against
/// a real server for CRDs.
pub fn openapi_group_version(path: &str) -> Option<Value> {
    let (group, version) = match path.split('/').collect::<Vec<_>>()[..] {
        ["api", version] => ("", version),
        ["apis", group, version] => (group, version),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && !r.create_only)
    {
        let patch = json!({
            "operationId": format!("patch{}", r.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(r.item_path(), json!({"patch": patch}));
    }
    (!paths.is_empty()).then(|| {
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes (Trellis fake API server)", "version": "v1.32.0"},
            "paths": paths,
            "components": {"schemas": {}},
        })
    })
}
