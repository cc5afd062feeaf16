//! Turning an authority into a Service's endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_proto::discovery::{Endpoint, ProtocolHint, Resilience, ServiceInfo};
use trellis_proto::SpiffeId;

use super::State;
use crate::model::{EndpointSlice, IntOrString, ObjectKey, Pod, Service, ServicePort};

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
    /// `hostname.service.namespace[.svc[.cluster.local]]`: one pod of a
    /// headless Service, by the `hostname` its EndpointSlice gives it (a
    /// StatefulSet's `web-0.web.ns`).
    PodName {
        hostname: String,
        service: ObjectKey,
    },
    /// A Service's ClusterIP, or a pod's IP.
    Ip(IpAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    /// The port is not a number.
    #[error("authority {0:?} has an invalid port")]
    BadPort(String),
    /// The name has no namespace part.
    #[error("authority {0:?} is not name.namespace[.svc.cluster.local][:port], pod.service.namespace[.svc.cluster.local][:port] nor ip:port")]
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
        return Ok((HostRef::Ip(ip), port));
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let short = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let labels: Vec<&str> = short.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return Err(AuthorityError::BadHost(authority.to_string()));
    }
    match labels.as_slice() {
        [name, namespace] => Ok((HostRef::Name(ObjectKey::new(namespace, name)), port)),
        [hostname, service, namespace] => Ok((
            HostRef::PodName {
                hostname: hostname.to_string(),
                service: ObjectKey::new(namespace, service),
            },
            port,
        )),
        _ => Err(AuthorityError::BadHost(authority.to_string())),
    }
}

/// FQDN slices name hosts, which a proxy does not dial as endpoints.
fn lists_ips(slice: &EndpointSlice) -> bool {
    matches!(slice.address_type.as_deref(), Some("IPv4" | "IPv6"))
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
            HostRef::Ip(ip) => {
                let (key, service) = self.services.iter().find(|(_, s)| {
                    // Each family's ClusterIP of a dual-stack Service.
                    let mut ips = s.spec.cluster_ip.iter().chain(&s.spec.cluster_ips);
                    ips.any(|c| c.parse::<IpAddr>().ok() == Some(ip))
                })?;
                (key.clone(), service)
            }
            HostRef::PodName { .. } => return None,
        };
        service
            .spec
            .ports
            .iter()
            .any(|p| p.port == port)
            .then_some((key, service, port))
    }

    /// A Service's ready endpoints, or else the one pod the authority
    /// names by IP or by name under a headless Service.
    pub(crate) fn resolve(&self, authority: &str) -> Option<ServiceEndpoints> {
        if let Some((key, service, port)) = self.find_service(authority) {
            return self.service_endpoints(key, service, port);
        }
        let (host, port) = parse_authority(authority).ok()?;
        let ip = match host {
            HostRef::Ip(ip) => ip,
            HostRef::PodName { hostname, service } => self.hostname_ip(&hostname, &service)?,
            HostRef::Name(_) => return None,
        };
        self.pod_endpoint(ip, port)
    }

    fn service_endpoints(
        &self,
        key: ObjectKey,
        service: &Service,
        port: u16,
    ) -> Option<ServiceEndpoints> {
        let service_port = service.spec.ports.iter().find(|p| p.port == port)?;
        let mut endpoints = BTreeMap::new();
        for slice in self.slices_of(&key) {
            self.collect_endpoints(service, service_port, slice, &mut endpoints);
        }
        Some(ServiceEndpoints {
            resilience: self.service_resilience(&key),
            service: key,
            port,
            endpoints,
        })
    }

    /// The EndpointSlices of a Service that list IP addresses.
    fn slices_of<'a>(&'a self, service: &'a ObjectKey) -> impl Iterator<Item = &'a EndpointSlice> {
        self.slices.values().filter(move |slice| {
            lists_ips(slice)
                && slice.metadata.key().namespace == service.namespace
                && slice.service_name() == Some(service.name.as_str())
        })
    }

    /// The address of the pod `hostname` of a headless Service.
    fn hostname_ip(&self, hostname: &str, service: &ObjectKey) -> Option<IpAddr> {
        self.slices_of(service)
            .flat_map(|slice| &slice.endpoints)
            .filter(|e| e.hostname.as_deref() == Some(hostname))
            .flat_map(|e| &e.addresses)
            .find_map(|a| a.parse().ok())
    }

    /// A connection straight to a pod (a StatefulSet's peers, a headless
    /// Service's addresses): that pod alone on the port dialled, with its
    /// identity when it is meshed, ready or not (the client chose it). Its
    /// ServiceInfo names the Service it backs, else the pod. An IP that
    /// several pods share (host networking) names none of them.
    fn pod_endpoint(&self, ip: IpAddr, port: u16) -> Option<ServiceEndpoints> {
        let is_ip = |a: &String| a.parse::<IpAddr>().ok() == Some(ip);
        // The first slice by name that lists it, so a pod behind several
        // Services is always reported as the same one (one pass, no sort:
        // this runs for every watch of a pod IP on every store change).
        let listed = self
            .slices
            .iter()
            .filter(|(_, slice)| lists_ips(slice))
            .filter_map(|(key, slice)| {
                let endpoint = slice
                    .endpoints
                    .iter()
                    .find(|e| e.addresses.iter().any(is_ip))?;
                Some((key, slice, endpoint))
            })
            .min_by_key(|(key, _, _)| *key)
            .map(|(_, slice, endpoint)| (slice, endpoint));
        let mut with_ip = self.pods.values().filter(|p| {
            let pod_ip = p.status.as_ref().and_then(|s| s.pod_ip.as_ref());
            pod_ip.is_some_and(is_ip)
        });
        let pod = match (with_ip.next(), with_ip.next()) {
            (_, Some(_)) => return None,
            (Some(pod), None) => Some(pod),
            (None, None) => listed.and_then(|(slice, endpoint)| {
                let target = endpoint.target_ref.as_ref()?;
                let namespace = slice.metadata.key().namespace;
                let ns = target.namespace.as_deref().unwrap_or(&namespace);
                self.pods.get(&ObjectKey::new(ns, &target.name))
            }),
        };
        let service = match (listed, pod) {
            (Some((slice, _)), _) if slice.service_name().is_some() => ObjectKey::new(
                &slice.metadata.key().namespace,
                slice.service_name().unwrap_or_default(),
            ),
            (_, Some(pod)) => pod.metadata.key(),
            _ => return None,
        };
        let app_protocol = listed
            .and_then(|(slice, _)| slice.ports.iter().find(|p| p.port == Some(port)))
            .and_then(|p| p.app_protocol.as_deref());
        let endpoint = self.endpoint(&ip.to_string(), port, app_protocol, pod);
        Some(ServiceEndpoints {
            resilience: self.service_resilience(&service),
            service,
            port,
            endpoints: BTreeMap::from([(format!("{ip}:{port}"), endpoint)]),
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
        for endpoint in &slice.endpoints {
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            let pod = endpoint.target_ref.as_ref().and_then(|r| {
                let ns = r.namespace.as_deref().unwrap_or(&namespace);
                self.pods.get(&ObjectKey::new(ns, &r.name))
            });
            for ip in &endpoint.addresses {
                let ep = self.endpoint(ip, target_port, app_protocol, pod);
                out.insert(format!("{ip}:{target_port}"), ep);
            }
        }
    }

    /// The endpoint `ip:port`, of `pod` when one is known.
    fn endpoint(
        &self,
        ip: &str,
        port: u16,
        app_protocol: Option<&str>,
        pod: Option<&Pod>,
    ) -> Endpoint {
        let mut ep = Endpoint {
            ip: ip.to_string(),
            port: u32::from(port),
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
        ep
    }
}
