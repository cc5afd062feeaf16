//! The Kubernetes objects the mesh reads, as plain serde types.
//!
//! Only the fields Trellis uses (and those its checks need) are modelled;
//! unknown fields are ignored, so ordinary manifests written for a real
//! cluster load unchanged — except in `ResiliencePolicy`, which refuses them
//! (see `resilience`). What the API server would refuse in the modelled
//! fields, the local source refuses too (`source::api_validation`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

mod authz;
mod grpcroute;
mod httproute;
mod resilience;
mod rollout;
pub use authz::*;
pub use grpcroute::*;
pub use httproute::*;
pub use resilience::*;
pub use rollout::*;

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl ObjectKey {
    /// The key of an object that lives in no namespace (a Namespace).
    pub fn cluster_scoped(name: &str) -> Self {
        Self::new("", name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.namespace.as_str() {
            "" => f.write_str(&self.name),
            namespace => write!(f, "{namespace}/{}", self.name),
        }
    }
}

/// `v1/Namespace`: its labels select what the mesh does in it (injection).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the API server; a Rollout's run is tied to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// RFC 3339; orders routes of equal precedence (oldest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// Objects without a namespace live in `default`, as kubectl applies them.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace.as_deref().unwrap_or("default"), &self.name)
    }
}

/// `v1/Service`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// ClusterIP (the default), NodePort, LoadBalancer or ExternalName.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Every family's ClusterIP (dual stack); the first is `clusterIP`.
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TCP (the default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: u16,
    /// A number or a named container port; only numbers are resolved here.
    /// 0 (or absent) means the same as `port`, as the API server defaults it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// IPv4, IPv6 or FQDN; required.
    #[serde(default)]
    pub address_type: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointConditions {
    /// Absent means ready, as the EndpointSlice API defines it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TCP (the default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Absent means the port is not restricted (the Service's targetPort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// `v1/Pod`: where a workload's identity (service account) and labels live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Native sidecars (`restartPolicy: Always`) are init containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The container name the injector gives the sidecar (a native sidecar, so
/// an init container; a pod with it in either list is meshed).
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// Pod annotation naming the sidecar's inbound port.
pub const INBOUND_PORT_ANNOTATION: &str = "trellis.dev/inbound-port";
/// The inbound port when the annotation is absent.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// Pod annotation naming the sidecar's admin port (its `/metrics`), which
/// the local-mode controller scrapes for rollout gates.
pub const ADMIN_PORT_ANNOTATION: &str = "trellis.dev/admin-port";
/// The admin port when the annotation is absent (the injected sidecar's).
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

impl Pod {
    pub fn is_meshed(&self) -> bool {
        self.spec
            .containers
            .iter()
            .chain(&self.spec.init_containers)
            .any(|c| c.name == PROXY_CONTAINER)
    }

    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .unwrap_or("default")
    }

    pub fn inbound_port(&self) -> u16 {
        self.metadata
            .annotations
            .get(INBOUND_PORT_ANNOTATION)
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_INBOUND_PORT)
    }

    pub fn admin_port(&self) -> u16 {
        self.metadata
            .annotations
            .get(ADMIN_PORT_ANNOTATION)
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_ADMIN_PORT)
    }
}

/// Any object the store knows, tagged by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    HttpFault(HttpFault),
    ResiliencePolicy(ResiliencePolicy),
    Rollout(Box<Rollout>),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Object {
    /// Every kind the mesh reads, as [`Object::kind`] names them.
    pub const KINDS: [&'static str; 10] = [
        "Namespace",
        "Service",
        "EndpointSlice",
        "Pod",
        "HTTPRoute",
        "GRPCRoute",
        "HTTPFault",
        "ResiliencePolicy",
        "Rollout",
        "AuthorizationPolicy",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Pod(_) => "Pod",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::HttpFault(_) => "HTTPFault",
            Object::ResiliencePolicy(_) => "ResiliencePolicy",
            Object::Rollout(_) => "Rollout",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(o) => ObjectKey::cluster_scoped(&o.metadata.name),
            Object::Service(o) => o.metadata.key(),
            Object::EndpointSlice(o) => o.metadata.key(),
            Object::Pod(o) => o.metadata.key(),
            Object::HttpRoute(o) => o.metadata.key(),
            Object::GrpcRoute(o) => o.metadata.key(),
            Object::HttpFault(o) => o.metadata.key(),
            Object::ResiliencePolicy(o) => o.metadata.key(),
            Object::Rollout(o) => o.metadata.key(),
            Object::AuthorizationPolicy(o) => o.metadata.key(),
        }
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_meshed_with_the_proxy_in_containers_or_as_a_native_sidecar() {
        let pod = |spec: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
                .unwrap()
        };
        let proxy = serde_json::json!([{"name": PROXY_CONTAINER}]);
        let app = serde_json::json!([{"name": "app"}]);
        assert!(pod(serde_json::json!({"containers": proxy})).is_meshed());
        assert!(pod(serde_json::json!({"containers": app, "initContainers": proxy})).is_meshed());
        assert!(!pod(serde_json::json!({"containers": app, "initContainers": app})).is_meshed());
    }
}
