//! The checks the API server makes when an object is created, for the
//! built-in kinds the mesh reads (Service, EndpointSlice, Pod) and for every
//! object's metadata, so the local source refuses what a cluster would.
//!
//! The rules are those of kubernetes/kubernetes `pkg/apis/core/validation`
//! (`ValidateService`, `validateServicePort`, `ValidatePodSpec`'s containers)
//! and `pkg/apis/discovery/validation` (`ValidateEndpointSlice`), applied, as
//! there, after the API server's defaults: protocol TCP, type ClusterIP,
//! targetPort equal to port.
//!
//! Not checked, so accepted here though a cluster may refuse them:
//! - fields the mesh does not model: an unknown or misspelt field is ignored,
//!   where `kubectl apply`'s strict field validation refuses it (run
//!   `kubernetes-validate --strict` on a file to catch those);
//! - Service `clusterIPs`, `ipFamilies`, `nodePort`s, session affinity,
//!   `externalIPs`, load-balancer fields; Pod fields beyond its containers'
//!   names and images, its service account and `status.podIP`;
//! - the size limit on all annotations together (256 KiB);
//! - Gateway API's own schema for HTTPRoute (`route_validation` checks what
//!   the mesh uses).
//!
//! One rule is deliberately not shared: endpoint addresses may be loopback
//! addresses (see `formats::special_ip`).

mod formats;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use formats::Format;

use crate::model::{EndpointSlice, IntOrString, Object, ObjectMeta, Pod, Service, ServicePort};

/// One field the API server would refuse, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field's path in the object, as kubectl prints it: `spec.ports[0].name`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field, and what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A required field is absent or empty.
    #[error("is required; {hint}")]
    Required { hint: &'static str },
    /// A value outside the field's enumeration.
    #[error("{value:?} is not supported; use {allowed}")]
    NotSupported {
        value: String,
        allowed: &'static str,
    },
    /// A string not in the format the field needs.
    #[error("{value:?} is not {format}")]
    Format { value: String, format: Format },
    /// A port number outside 1-65535.
    #[error("{0} is not a port number; use 1-65535")]
    Port(u16),
    /// A value that must be unique among its siblings.
    #[error("{value} is also at {first}; each must be unique, so remove or change one")]
    Duplicate { value: String, first: String },
    /// More entries than the API server allows in one object.
    #[error("has {count} entries, and at most {max} are allowed; split them over several objects")]
    TooMany { count: usize, max: usize },
    /// A value the API server refuses in this place.
    #[error("{value:?} {why}")]
    Invalid { value: String, why: &'static str },
}

/// Every field of one object the API server would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl std::error::Error for FieldErrors {}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Checks `object` as the API server would on create.
pub fn validate(object: &Object) -> Result<(), FieldErrors> {
    let mut checks = Checks::default();
    match object {
        Object::Namespace(n) => metadata(&mut checks, &n.metadata, Format::Dns1123Label),
        Object::Service(s) => service(&mut checks, s),
        Object::EndpointSlice(s) => endpoint_slice(&mut checks, s),
        Object::Pod(p) => pod(&mut checks, p),
        // Custom resources' names are DNS subdomains.
        Object::HttpRoute(r) => metadata(&mut checks, &r.metadata, Format::Dns1123Subdomain),
        Object::GrpcRoute(r) => metadata(&mut checks, &r.metadata, Format::Dns1123Subdomain),
        Object::HttpFault(f) => metadata(&mut checks, &f.metadata, Format::Dns1123Subdomain),
        Object::ResiliencePolicy(p) => metadata(&mut checks, &p.metadata, Format::Dns1123Subdomain),
        Object::Rollout(r) => metadata(&mut checks, &r.metadata, Format::Dns1123Subdomain),
        Object::AuthorizationPolicy(p) => {
            metadata(&mut checks, &p.metadata, Format::Dns1123Subdomain)
        }
    }
    if checks.0.is_empty() {
        Ok(())
    } else {
        Err(FieldErrors(checks.0))
    }
}

/// The refusals found so far.
#[derive(Default)]
struct Checks(Vec<FieldError>);

impl Checks {
    fn fail(&mut self, field: impl Into<String>, problem: Problem) {
        self.0.push(FieldError {
            field: field.into(),
            problem,
        });
    }

    fn format(&mut self, field: impl Into<String>, value: &str, format: Format) {
        if !format.admits(value) {
            let value = value.to_string();
            self.fail(field, Problem::Format { value, format });
        }
    }

    fn one_of(&mut self, field: impl Into<String>, value: &str, allowed: &'static str) {
        if !allowed.split(", ").any(|a| a == value) {
            let value = value.to_string();
            self.fail(field, Problem::NotSupported { value, allowed });
        }
    }

    fn at_most(&mut self, field: impl Into<String>, count: usize, max: usize) {
        if count > max {
            self.fail(field, Problem::TooMany { count, max });
        }
    }

    /// Records `value` at `field` among `seen`, failing if it was there.
    fn unique(&mut self, seen: &mut BTreeMap<String, String>, value: String, field: String) {
        match seen.get(&value) {
            Some(first) => {
                let first = first.clone();
                self.fail(field, Problem::Duplicate { value, first });
            }
            None => drop(seen.insert(value, field)),
        }
    }

    fn labels(&mut self, field: &str, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            self.format(field, key, Format::QualifiedName);
            self.format(format!("{field}[{key}]"), value, Format::LabelValue);
        }
    }
}

const PROTOCOLS: &str = "TCP, UDP, SCTP";

fn metadata(checks: &mut Checks, meta: &ObjectMeta, name: Format) {
    checks.format("metadata.name", &meta.name, name);
    if let Some(namespace) = meta.namespace.as_deref().filter(|n| !n.is_empty()) {
        checks.format("metadata.namespace", namespace, Format::Dns1123Label);
    }
    checks.labels("metadata.labels", &meta.labels);
    for key in meta.annotations.keys() {
        // The API server checks annotation keys in lower case.
        checks.format(
            "metadata.annotations",
            &key.to_lowercase(),
            Format::QualifiedName,
        );
    }
}

fn service(checks: &mut Checks, service: &Service) {
    // A Service's name becomes a DNS label, so it must start with a letter.
    metadata(checks, &service.metadata, Format::Dns1035Label);
    let spec = &service.spec;
    let service_type = spec.service_type.as_deref().unwrap_or("ClusterIP");
    checks.one_of(
        "spec.type",
        service_type,
        "ClusterIP, NodePort, LoadBalancer, ExternalName",
    );
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let headless = cluster_ip == "None";
    if !cluster_ip.is_empty() && !headless {
        checks.format("spec.clusterIP", cluster_ip, Format::Ip);
    }
    if spec.cluster_ips.len() > 2 {
        let count = spec.cluster_ips.len();
        checks.fail("spec.clusterIPs", Problem::TooMany { count, max: 2 });
    }
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        if ip != "None" {
            checks.format(format!("spec.clusterIPs[{i}]"), ip, Format::Ip);
        }
    }
    match spec.cluster_ips.first() {
        Some(first) if !cluster_ip.is_empty() && first != cluster_ip => checks.fail(
            "spec.clusterIPs[0]",
            Problem::Invalid {
                value: first.clone(),
                why: "must be the same as spec.clusterIP (the primary family's address)",
            },
        ),
        _ => {}
    }
    match service_type {
        "NodePort" | "LoadBalancer" if headless => checks.fail(
            "spec.clusterIP",
            Problem::Invalid {
                value: cluster_ip.into(),
                why: "is not allowed for NodePort and LoadBalancer Services; remove it or use type ClusterIP",
            },
        ),
        "ExternalName" => {
            if !cluster_ip.is_empty() {
                checks.fail(
                    "spec.clusterIP",
                    Problem::Invalid {
                        value: cluster_ip.into(),
                        why: "must not be set for an ExternalName Service; remove it",
                    },
                );
            }
            // The name (a CNAME) may end in a dot, as fully qualified.
            match spec.external_name.as_deref().map(|n| n.strip_suffix('.').unwrap_or(n)) {
                Some(name) if !name.is_empty() => {
                    checks.format("spec.externalName", name, Format::Dns1123Subdomain)
                }
                _ => checks.fail(
                    "spec.externalName",
                    Problem::Required {
                        hint: "an ExternalName Service names the host it stands for, e.g. externalName: db.example.com",
                    },
                ),
            }
        }
        _ => {}
    }
    if spec.ports.is_empty() && !headless && service_type != "ExternalName" {
        checks.fail(
            "spec.ports",
            Problem::Required {
                hint: "a Service needs at least one port unless it is headless (clusterIP: None) \
                       or of type ExternalName; add e.g. ports: [{name: http, port: 8080}]",
            },
        );
    }
    let mut names = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        service_port(checks, port, &at, spec.ports.len() > 1, &mut names);
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        checks.unique(&mut ports, format!("port {}/{protocol}", port.port), at);
    }
    checks.labels("spec.selector", &spec.selector);
}

fn service_port(
    checks: &mut Checks,
    port: &ServicePort,
    at: &str,
    name_required: bool,
    names: &mut BTreeMap<String, String>,
) {
    match port.name.as_deref().unwrap_or("") {
        "" if name_required => checks.fail(
            format!("{at}.name"),
            Problem::Required {
                hint: "every port of a Service with several ports needs a name, e.g. name: http",
            },
        ),
        "" => {}
        name => {
            checks.format(format!("{at}.name"), name, Format::Dns1123Label);
            checks.unique(names, format!("name {name:?}"), format!("{at}.name"));
        }
    }
    if port.port == 0 {
        checks.fail(format!("{at}.port"), Problem::Port(0));
    }
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    checks.one_of(format!("{at}.protocol"), protocol, PROTOCOLS);
    // 0 and "" are defaulted to `port`; any other number fits in a u16.
    if let Some(IntOrString::String(name)) = &port.target_port {
        if !name.is_empty() {
            checks.format(format!("{at}.targetPort"), name, Format::PortName);
        }
    }
    if let Some(app_protocol) = &port.app_protocol {
        checks.format(
            format!("{at}.appProtocol"),
            app_protocol,
            Format::QualifiedName,
        );
    }
}

/// The API server's bounds on one EndpointSlice.
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_PORTS: usize = 100;

fn endpoint_slice(checks: &mut Checks, slice: &EndpointSlice) {
    metadata(checks, &slice.metadata, Format::Dns1123Subdomain);
    let address_type = slice.address_type.as_deref().unwrap_or("");
    if address_type.is_empty() {
        checks.fail(
            "addressType",
            Problem::Required {
                hint: "say what the endpoints' addresses are: addressType: IPv4 (or IPv6, FQDN)",
            },
        );
    } else {
        checks.one_of("addressType", address_type, "IPv4, IPv6, FQDN");
    }
    checks.at_most("endpoints", slice.endpoints.len(), MAX_ENDPOINTS);
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let at = format!("endpoints[{i}].addresses");
        if endpoint.addresses.is_empty() {
            checks.fail(
                &at,
                Problem::Required {
                    hint: "an endpoint has at least one address, e.g. addresses: [\"10.1.2.3\"]",
                },
            );
        }
        checks.at_most(&at, endpoint.addresses.len(), MAX_ADDRESSES);
        for (j, address) in endpoint.addresses.iter().enumerate() {
            endpoint_address(checks, address_type, address, format!("{at}[{j}]"));
        }
        if let Some(hostname) = &endpoint.hostname {
            checks.format(
                format!("endpoints[{i}].hostname"),
                hostname,
                Format::Dns1123Label,
            );
        }
    }
    checks.at_most("ports", slice.ports.len(), MAX_PORTS);
    let mut names = BTreeMap::new();
    for (i, port) in slice.ports.iter().enumerate() {
        let at = format!("ports[{i}]");
        let name = port.name.as_deref().unwrap_or("");
        if !name.is_empty() {
            checks.format(format!("{at}.name"), name, Format::Dns1123Label);
        }
        // Unnamed counts as a name: a slice has at most one unnamed port.
        checks.unique(&mut names, format!("name {name:?}"), format!("{at}.name"));
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        checks.one_of(format!("{at}.protocol"), protocol, PROTOCOLS);
        if let Some(app_protocol) = &port.app_protocol {
            checks.format(
                format!("{at}.appProtocol"),
                app_protocol,
                Format::QualifiedName,
            );
        }
    }
}

fn endpoint_address(checks: &mut Checks, address_type: &str, address: &str, at: String) {
    let format = match address_type {
        "IPv4" => Format::Ipv4,
        "IPv6" => Format::Ipv6,
        "FQDN" => Format::Fqdn,
        // An unsupported addressType is reported once, not per address.
        _ => return,
    };
    if !format.admits(address) {
        checks.format(at, address, format);
    } else if let Some(why) = address.parse::<IpAddr>().ok().and_then(formats::special_ip) {
        checks.fail(
            at,
            Problem::Invalid {
                value: address.into(),
                why,
            },
        );
    }
}

fn pod(checks: &mut Checks, pod: &Pod) {
    metadata(checks, &pod.metadata, Format::Dns1123Subdomain);
    let spec = &pod.spec;
    if spec.containers.is_empty() {
        checks.fail(
            "spec.containers",
            Problem::Required {
                hint: "a Pod runs at least one container, e.g. containers: [{name: app, image: app:1.0}]",
            },
        );
    }
    let mut names = BTreeMap::new();
    for (i, container) in spec.containers.iter().enumerate() {
        let at = format!("spec.containers[{i}]");
        if container.name.is_empty() {
            checks.fail(
                format!("{at}.name"),
                Problem::Required {
                    hint: "every container has a name, e.g. name: app",
                },
            );
        } else {
            checks.format(format!("{at}.name"), &container.name, Format::Dns1123Label);
            let name = format!("name {:?}", container.name);
            checks.unique(&mut names, name, format!("{at}.name"));
        }
        if container.image.as_deref().unwrap_or("").is_empty() {
            checks.fail(
                format!("{at}.image"),
                Problem::Required {
                    hint: "every container runs an image, e.g. image: nginx:1.27",
                },
            );
        }
    }
    if let Some(account) = &spec.service_account_name {
        checks.format("spec.serviceAccountName", account, Format::Dns1123Subdomain);
    }
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        checks.format("status.podIP", ip, Format::Ip);
    }
}

#[cfg(test)]
mod tests;
