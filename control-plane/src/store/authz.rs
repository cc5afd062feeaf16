//! Resolving a workload's inbound authorization: which AuthorizationPolicies
//! select its pod and ports, their rules with service accounts turned into
//! SPIFFE IDs, and its namespace's default. The controller streams the
//! result to the pod's proxy; `meshctl authz` prints the same answer.
//!
//! Semantics (the README says the same):
//! - a port selected by at least one policy, in either mode, allows only
//!   what one of its policies' rules allows: default-deny;
//! - a port no policy selects follows the namespace annotation
//!   `trellis.dev/default-inbound-policy` (`all-unauthenticated` when absent);
//! - a policy with no `ports` selects every port of its pods; one with an
//!   empty selector every pod of its namespace (also a pod the store does not
//!   know, so a proxy whose pod is not found is never less protected).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use trellis_proto::discovery::{
    caller, AuthorizationRule, Caller, DefaultPolicy, HttpAuthorizationMatch, InboundPolicy,
    PathMatch, PortPolicy,
};
use trellis_proto::SpiffeId;

use super::{State, Store};
use crate::model::{
    AuthorizationPolicy, CallerSpec, ObjectKey, Pod, PolicyMode, DEFAULT_INBOUND_POLICY_ANNOTATION,
};

/// The port number that stands for "every port not listed" in
/// [`InboundPolicy::ports`]: what policies without `ports` allow.
pub const EVERY_PORT: u32 = 0;

/// The namespace default: what a port no policy selects allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultInboundPolicy {
    /// Everyone (the mesh's behaviour without any policy).
    #[default]
    AllUnauthenticated,
    /// Clients with a verified mesh identity.
    AllMeshed,
    Deny,
}

impl FromStr for DefaultInboundPolicy {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "all-unauthenticated" => Ok(Self::AllUnauthenticated),
            "all-meshed" => Ok(Self::AllMeshed),
            "deny" => Ok(Self::Deny),
            _ => Err(()),
        }
    }
}

impl fmt::Display for DefaultInboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllMeshed => "all-meshed",
            Self::Deny => "deny",
        })
    }
}

impl From<DefaultInboundPolicy> for DefaultPolicy {
    fn from(policy: DefaultInboundPolicy) -> Self {
        match policy {
            DefaultInboundPolicy::AllUnauthenticated => DefaultPolicy::AllUnauthenticated,
            DefaultInboundPolicy::AllMeshed => DefaultPolicy::AllMeshed,
            DefaultInboundPolicy::Deny => DefaultPolicy::Deny,
        }
    }
}

impl From<DefaultPolicy> for DefaultInboundPolicy {
    fn from(policy: DefaultPolicy) -> Self {
        match policy {
            DefaultPolicy::AllUnauthenticated => Self::AllUnauthenticated,
            DefaultPolicy::AllMeshed => Self::AllMeshed,
            DefaultPolicy::Deny => Self::Deny,
        }
    }
}

impl Store {
    /// The inbound policy of the pod a proxy of `namespace` runs in: found by
    /// `pod` name, else by `pod_ip` (see [`State::find_pod`]).
    pub fn inbound_policy(&self, namespace: &str, pod: &str, pod_ip: &str) -> InboundPolicy {
        let state = self.lock();
        let pod = state.find_pod(namespace, pod, pod_ip);
        state.inbound_policy(namespace, pod)
    }
}

impl State {
    /// A pod of `namespace` by name, or by IP (its `status.podIP`, or an
    /// EndpointSlice endpoint with that address and a Pod `targetRef`).
    /// 127.0.0.1 and unspecified addresses identify nobody: every local-mode
    /// workload may use them.
    fn find_pod(&self, namespace: &str, name: &str, ip: &str) -> Option<&Pod> {
        if !name.is_empty() {
            return self.pods.get(&ObjectKey::new(namespace, name));
        }
        let shared = ip.parse::<IpAddr>().map_or(true, |ip| {
            ip.is_unspecified()
                || ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
        });
        if shared {
            return None;
        }
        let in_namespace = |key: &ObjectKey| key.namespace == namespace;
        let by_status = self.pods.iter().find(|(key, pod)| {
            in_namespace(key) && pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip)
        });
        if let Some((_, pod)) = by_status {
            return Some(pod);
        }
        self.slices
            .iter()
            .filter(|(key, _)| in_namespace(key))
            .flat_map(|(_, slice)| &slice.endpoints)
            .filter(|endpoint| endpoint.addresses.iter().any(|a| a == ip))
            .filter_map(|endpoint| endpoint.target_ref.as_ref())
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .find_map(|target| self.pods.get(&ObjectKey::new(namespace, &target.name)))
    }

    /// The namespace default; an unknown annotation value (which the sources
    /// refuse) denies, so a typo never opens a namespace.
    pub(crate) fn default_inbound_policy(&self, namespace: &str) -> DefaultInboundPolicy {
        self.namespaces
            .get(&ObjectKey::cluster_scoped(namespace))
            .and_then(|n| {
                n.metadata
                    .annotations
                    .get(DEFAULT_INBOUND_POLICY_ANNOTATION)
            })
            .map_or(DefaultInboundPolicy::AllUnauthenticated, |value| {
                value.parse().unwrap_or(DefaultInboundPolicy::Deny)
            })
    }

    pub(crate) fn inbound_policy(&self, namespace: &str, pod: Option<&Pod>) -> InboundPolicy {
        let mut policies: Vec<&AuthorizationPolicy> = self
            .authorization_policies
            .iter()
            .filter(|(key, _)| key.namespace == namespace)
            .map(|(_, policy)| policy)
            .filter(|policy| match pod {
                Some(pod) => policy.spec.selector.matches(&pod.metadata.labels),
                None => policy.spec.selector.selects_all(),
            })
            .collect();
        policies.sort_by_key(|p| p.metadata.key());
        resolve(
            &self.trust_domain,
            pod.map(|p| p.metadata.key().to_string()),
            self.default_inbound_policy(namespace),
            &policies,
        )
    }
}

/// The resolved policy of a workload selected by `policies` (in order).
fn resolve(
    trust_domain: &str,
    workload: Option<String>,
    default: DefaultInboundPolicy,
    policies: &[&AuthorizationPolicy],
) -> InboundPolicy {
    let listed: BTreeSet<u32> = policies
        .iter()
        .flat_map(|p| p.spec.ports.iter().map(|port| u32::from(*port)))
        .collect();
    let every_port = policies.iter().any(|p| p.spec.ports.is_empty());
    let mut ports: BTreeMap<u32, PortPolicy> = BTreeMap::new();
    let targets = listed
        .iter()
        .copied()
        .chain(every_port.then_some(EVERY_PORT));
    for port in targets {
        let entry = ports.entry(port).or_insert_with(|| PortPolicy {
            port,
            ..PortPolicy::default()
        });
        for policy in policies {
            let selects = policy.spec.ports.is_empty()
                || policy.spec.ports.iter().any(|p| u32::from(*p) == port);
            if !selects {
                continue;
            }
            let name = policy.metadata.key().to_string();
            let audit = policy.spec.mode == PolicyMode::Audit;
            if audit {
                entry.audit_policies.push(name.clone());
            } else {
                entry.enforce_policies.push(name.clone());
            }
            let policy_namespace = policy.metadata.key().namespace;
            for allow in &policy.spec.allow {
                entry.rules.push(AuthorizationRule {
                    policy: name.clone(),
                    audit,
                    callers: allow
                        .from
                        .iter()
                        .filter_map(|c| resolve_caller(trust_domain, &policy_namespace, c))
                        .collect(),
                    http: allow
                        .to
                        .iter()
                        .map(|to| HttpAuthorizationMatch {
                            paths: to
                                .paths
                                .iter()
                                .map(|p| PathMatch {
                                    exact: p.match_type == "Exact",
                                    value: p.value.clone(),
                                })
                                .collect(),
                            methods: to.methods.clone(),
                        })
                        .collect(),
                });
            }
        }
    }
    InboundPolicy {
        workload: workload.unwrap_or_default(),
        default_policy: DefaultPolicy::from(default).into(),
        ports: ports.into_values().collect(),
    }
}

/// One caller as the proxy matches it; a service account becomes its SPIFFE ID.
fn resolve_caller(trust_domain: &str, policy_namespace: &str, spec: &CallerSpec) -> Option<Caller> {
    let kind = if let Some(identity) = &spec.identity {
        caller::Kind::Identity(identity.clone())
    } else if let Some(sa) = &spec.service_account {
        let namespace = sa.namespace.as_deref().unwrap_or(policy_namespace);
        caller::Kind::Identity(SpiffeId::new(trust_domain, namespace, &sa.name).to_string())
    } else if let Some(namespace) = &spec.namespace {
        caller::Kind::Namespace(namespace.clone())
    } else if spec.meshed == Some(true) {
        caller::Kind::Meshed(true)
    } else if spec.unauthenticated == Some(true) {
        caller::Kind::Unauthenticated(true)
    } else {
        // Refused by validation; allows nobody if it ever gets here.
        return None;
    };
    Some(Caller { kind: Some(kind) })
}

#[cfg(test)]
mod tests;
