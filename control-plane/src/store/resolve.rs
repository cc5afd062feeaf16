//! Turning an authority into a Service's endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_proto::discovery::{Endpoint, ProtocolHint, Resilience, ServiceInfo};
use trellis_proto::SpiffeId;

use super::State;
use crate::model::{EndpointSlice, IntOrString, ObjectKey, Service, ServicePort};

/// The endpoints of one port of one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEndpoints {
    pub service: ObjectKey,
    pub port: u16,
    /// From the ResiliencePolicy that targets the Service, if any.
    pub resilience: Option<Resilience>,
    /// Keyed by `ip:port`, so diffs and snapshots are deterministic.
    pub endpoints: BTreeMap<String, Endpoint>,
}

impl ServiceEndpoints {
    /// What a Snapshot says about the Service besides its endpoints.
    pub fn info(&self) -> ServiceInfo {
        ServiceInfo {
            name: self.service.name.clone(),
            namespace: self.service.namespace.clone(),
            port: u32::from(self.port),
            resilience: self.resilience,
        }
    }
}

/// The host part of an authority, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRef {
    /// `name.namespace[.svc[.cluster.local]]`
    Name(ObjectKey),
    /// A Service's ClusterIP.
    ClusterIp(IpAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    /// The port is not a number.
    #[error("authority {0:?} has an invalid port")]
    BadPort(String),
    /// The name has no namespace part.
    #[error("authority {0:?} is not name.namespace[.svc.cluster.local][:port] nor clusterIP:port")]
    BadHost(String),
}

/// Parses `host[:port]` (port 80 when absent) against the cluster domain.
pub fn parse_authority(authority: &str) -> Result<(HostRef, u16), AuthorityError> {
    let (host, port) = match authority.rsplit_once(':') {
        // A bare IPv6 address has colons but no port.
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| AuthorityError::BadPort(authority.to_string()))?;
            (host, port)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((HostRef::ClusterIp(ip), port));
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let short = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    match short.split('.').collect::<Vec<_>>().as_slice() {
        [name, namespace] if !name.is_empty() && !namespace.is_empty() => {
            Ok((HostRef::Name(ObjectKey::new(namespace, name)), port))
        }
        _ => Err(AuthorityError::BadHost(authority.to_string())),
    }
}

fn protocol_hint(app_protocol: Option<&str>) -> ProtocolHint {
    match app_protocol {
        Some("http") => ProtocolHint::Http1,
        Some("kubernetes.io/h2c" | "grpc" | "h2c" | "http2") => ProtocolHint::Http2,
        Some("tcp" | "kubernetes.io/tcp") => ProtocolHint::Opaque,
        _ => ProtocolHint::Unknown,
    }
}

impl State {
    /// The Service an authority names, if it has that port.
    pub(crate) fn find_service(&self, authority: &str) -> Option<(ObjectKey, &Service, u16)> {
        let (host, port) = parse_authority(authority).ok()?;
        let (key, service) = match host {
            HostRef::Name(key) => {
                let service = self.services.get(&key)?;
                (key, service)
            }
            HostRef::ClusterIp(ip) => {
                let (key, service) = self.services.iter().find(|(_, s)| {
                    s.spec
                        .cluster_ip
                        .as_deref()
                        .and_then(|c| c.parse::<IpAddr>().ok())
                        == Some(ip)
                })?;
                (key.clone(), service)
            }
        };
        service
            .spec
            .ports
            .iter()
            .any(|p| p.port == port)
            .then_some((key, service, port))
    }

    pub(crate) fn resolve(&self, authority: &str) -> Option<ServiceEndpoints> {
        let (key, service, port) = self.find_service(authority)?;
        let service_port = service.spec.ports.iter().find(|p| p.port == port)?;
        let mut endpoints = BTreeMap::new();
        for slice in self.slices.values() {
            if slice.metadata.key().namespace != key.namespace
                || slice.service_name() != Some(key.name.as_str())
            {
                continue;
            }
            self.collect_endpoints(service, service_port, slice, &mut endpoints);
        }
        Some(ServiceEndpoints {
            resilience: self.service_resilience(&key),
            service: key,
            port,
            endpoints,
        })
    }

    fn collect_endpoints(
        &self,
        service: &Service,
        service_port: &ServicePort,
        slice: &EndpointSlice,
        out: &mut BTreeMap<String, Endpoint>,
    ) {
        let namespace = service.metadata.key().namespace;
        // The slice port that serves this Service port carries the same name.
        let slice_port = slice.ports.iter().find(|p| {
            p.name.as_deref().unwrap_or("") == service_port.name.as_deref().unwrap_or("")
        });
        // A targetPort of 0 (or none) means `port`, as the API server defaults it.
        let target_port = match (slice_port.and_then(|p| p.port), &service_port.target_port) {
            (Some(p), _) => p,
            (None, Some(IntOrString::Int(p))) if *p != 0 => *p,
            (None, _) => service_port.port,
        };
        let app_protocol = slice_port
            .and_then(|p| p.app_protocol.as_deref())
            .or(service_port.app_protocol.as_deref());
        // FQDN slices name hosts, which a proxy does not dial as endpoints.
        if !matches!(slice.address_type.as_deref(), Some("IPv4" | "IPv6")) {
            return;
        }
        for endpoint in &slice.endpoints {
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            let pod = endpoint.target_ref.as_ref().and_then(|r| {
                let ns = r.namespace.as_deref().unwrap_or(&namespace);
                self.pods.get(&ObjectKey::new(ns, &r.name))
            });
            for ip in &endpoint.addresses {
                let mut ep = Endpoint {
                    ip: ip.clone(),
                    port: u32::from(target_port),
                    weight: 1,
                    protocol: protocol_hint(app_protocol) as i32,
                    ..Endpoint::default()
                };
                if let Some(pod) = pod {
                    ep.pod = pod.metadata.name.clone();
                    ep.labels = pod.metadata.labels.clone().into_iter().collect();
                    if pod.is_meshed() {
                        let pod_ns = pod.metadata.key().namespace;
                        let id = SpiffeId::new(&self.trust_domain, &pod_ns, pod.service_account());
                        ep.identity = id.to_string();
                        ep.proxy_port = u32::from(pod.inbound_port());
                    }
                }
                out.insert(format!("{ip}:{target_port}"), ep);
            }
        }
    }
}
