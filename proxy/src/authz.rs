//! Inbound authorization: who may call this workload's ports, from the
//! policy the controller streams (AuthorizationPolicies and the namespace
//! default, resolved there). Checked per HTTP request — so a change applies
//! to requests on connections already open — and at the start of opaque TCP
//! connections, always before the application sees a byte.
//!
//! The decision for a request to `port`:
//! 1. the port's Enforce rules (or, when the port is not listed, the rules
//!    for every port): one that allows the caller and request allows it;
//! 2. with Enforce policies on the port and no rule allowing: denied
//!    (default-deny once a policy selects the port);
//! 3. otherwise the namespace default decides (`all-unauthenticated`,
//!    `all-meshed`, `deny`); if it allows and Audit policies select the
//!    port, they are evaluated as if enforced: what none of their rules
//!    allows is allowed, counted as `decision="deny",mode="audit"` and
//!    logged (at most one line a second).
//!
//! Each request counts once in `trellis_inbound_authz_total{decision,
//! policy, mode}`: `policy` is the allowing rule's `namespace/name`, the
//! policies selecting the port (comma-separated) for a denial they caused,
//! or `default:<namespace default>`.
//!
//! Until the first policy arrives, requests and connections wait for it (up
//! to `TRELLIS_DISCOVERY_TIMEOUT`), then are refused as retryable (503, or
//! a closed connection): the proxy never guesses who is allowed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::Method;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::watch;
use trellis_proto::discovery::{caller, DefaultPolicy, InboundPolicy, InboundPolicyRequest};
use trellis_proto::SpiffeId;

use crate::config::{Config, TokenSource};
use crate::discovery::Discovery;

/// What is being authorized.
#[derive(Clone, Copy, Debug)]
pub enum Access<'a> {
    /// One HTTP request.
    Http { method: &'a Method, path: &'a str },
    /// An opaque TCP connection: only rules without `to` can allow it.
    Connection,
}

/// Why a request or connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The policy does not allow it; the text says which policy and why.
    #[error("{0}")]
    Unauthorized(String),
    /// No policy arrived from the controller in time.
    #[error("this workload's authorization policy is not known yet (none from the controller within {0:?}); try again")]
    Pending(Duration),
}

/// The inbound policy in force, and its counters.
pub struct Authz {
    current: ArcSwapOption<Compiled>,
    /// True once a policy arrived; keeps the controller watch alive.
    arrived: watch::Receiver<bool>,
    patience: Duration,
    counters: IntCounterVec,
    log: RateLimit,
}

impl Authz {
    /// An authorizer that waits for a policy set with [`install`](Self::install).
    pub fn new(counters: IntCounterVec, patience: Duration) -> (Arc<Self>, watch::Sender<bool>) {
        let (tx, arrived) = watch::channel(false);
        let authz = Arc::new(Self {
            current: ArcSwapOption::empty(),
            arrived,
            patience,
            counters,
            log: RateLimit::default(),
        });
        (authz, tx)
    }

    /// Follows this workload's policy from the controller.
    pub fn watch(counters: IntCounterVec, discovery: &Discovery, config: &Config) -> Arc<Self> {
        let (authz, arrived) = Self::new(counters, config.discovery_timeout);
        let request = InboundPolicyRequest {
            identity: config.identity.to_string(),
            token: String::new(),
            pod: config.pod.clone(),
            pod_ip: config.app_ip.to_string(),
        };
        let token = config.token.clone();
        let weak = Arc::downgrade(&authz);
        discovery.inbound_policy(
            move || {
                let (mut request, token) = (request.clone(), token.clone());
                async move {
                    request.token = read_token(&token).await?;
                    Ok(request)
                }
            },
            move |policy| {
                if let Some(authz) = weak.upgrade() {
                    authz.install(policy);
                }
            },
            arrived,
        );
        authz
    }

    /// Makes `policy` the one in force (for the next request).
    pub fn install(&self, policy: InboundPolicy) {
        tracing::info!(workload = %policy.workload, ports = policy.ports.len(), "inbound authorization policy");
        self.current
            .store(Some(Arc::new(Compiled::new(policy, &self.counters))));
    }

    /// Decides, counts and logs one request or connection to `port` from
    /// `client` (`None`: plaintext).
    pub async fn check(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
        access: Access<'_>,
    ) -> Result<(), Refused> {
        let policy = match self.current.load_full() {
            Some(policy) => policy,
            None => self.first_policy().await?,
        };
        let decision = policy.decide(port, client, access);
        decision.counter.inc();
        match decision.verdict {
            Verdict::Allow => Ok(()),
            Verdict::AuditDeny(reason) => {
                if self.log.allow() {
                    tracing::warn!(port, %reason, "audit: an AuthorizationPolicy would deny this (allowed)");
                }
                Ok(())
            }
            Verdict::Deny(reason) => {
                if self.log.allow() {
                    tracing::info!(port, %reason, "inbound request denied");
                }
                Err(Refused::Unauthorized(reason))
            }
        }
    }

    async fn first_policy(&self) -> Result<Arc<Compiled>, Refused> {
        let mut arrived = self.arrived.clone();
        let arrived = tokio::time::timeout(self.patience, arrived.wait_for(|a| *a))
            .await
            .is_ok_and(|result| result.is_ok());
        match self.current.load_full() {
            Some(policy) if arrived => Ok(policy),
            _ => Err(Refused::Pending(self.patience)),
        }
    }
}

async fn read_token(source: &TokenSource) -> Result<String, tonic::Status> {
    crate::identity::read_token(source)
        .await
        .map_err(|e| tonic::Status::unauthenticated(e.to_string()))
}

/// At most one log line a second, so a denied flood cannot flood the log.
#[derive(Default)]
struct RateLimit {
    last: AtomicU64,
}

impl RateLimit {
    fn allow(&self) -> bool {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        last != now
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The outcome of one check.
pub struct Decision {
    pub verdict: Verdict,
    /// The series it is counted in.
    counter: IntCounter,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed, though an Audit policy would deny it (why).
    AuditDeny(String),
    Deny(String),
}

/// A policy ready to decide: callers parsed, counters resolved once.
pub struct Compiled {
    default: NamespaceDefault,
    ports: HashMap<u16, Port>,
    every_port: Option<Port>,
}

/// The namespace default, for ports no policy decides.
struct NamespaceDefault {
    policy: DefaultPolicy,
    allowed: IntCounter,
    denied: IntCounter,
}

struct Port {
    rules: Vec<Rule>,
    /// Selected by an Enforce policy: default-deny.
    enforced: bool,
    /// `namespace/name` of the Enforce (or, without any, Audit) policies.
    policies: String,
    audited: bool,
    denied: IntCounter,
    audit_denied: IntCounter,
}

struct Rule {
    audit: bool,
    callers: Vec<CallerMatch>,
    http: Vec<HttpMatch>,
    allowed: IntCounter,
}

enum CallerMatch {
    Identity(SpiffeId),
    Namespace(String),
    Meshed,
    Anyone,
}

struct HttpMatch {
    paths: Vec<(bool, String)>,
    methods: Vec<String>,
}

impl Compiled {
    pub fn new(policy: InboundPolicy, counters: &IntCounterVec) -> Self {
        let counter = |decision: &str, policy: &str, mode: &str| {
            counters.with_label_values(&[decision, policy, mode])
        };
        let default_policy = policy.default_policy();
        let default_label = format!("default:{}", default_name(default_policy));
        let default = NamespaceDefault {
            policy: default_policy,
            allowed: counter("allow", &default_label, "enforce"),
            denied: counter("deny", &default_label, "enforce"),
        };
        let mut ports = HashMap::new();
        let mut every_port = None;
        for port in policy.ports {
            let enforced = !port.enforce_policies.is_empty();
            let audited = !port.audit_policies.is_empty();
            let policies = if enforced {
                port.enforce_policies.join(",")
            } else {
                port.audit_policies.join(",")
            };
            let rules = port
                .rules
                .into_iter()
                .map(|rule| {
                    let mode = if rule.audit { "audit" } else { "enforce" };
                    Rule {
                        audit: rule.audit,
                        allowed: counter("allow", &rule.policy, mode),
                        callers: rule
                            .callers
                            .into_iter()
                            .filter_map(compile_caller)
                            .collect(),
                        http: rule
                            .http
                            .into_iter()
                            .map(|m| HttpMatch {
                                paths: m.paths.into_iter().map(|p| (p.exact, p.value)).collect(),
                                methods: m.methods,
                            })
                            .collect(),
                    }
                })
                .collect();
            let compiled = Port {
                rules,
                enforced,
                audited,
                denied: counter("deny", &policies, "enforce"),
                audit_denied: counter("deny", &policies, "audit"),
                policies,
            };
            match u16::try_from(port.port) {
                Ok(0) => every_port = Some(compiled),
                Ok(number) => drop(ports.insert(number, compiled)),
                // Not a port: nothing can ask for it.
                Err(_) => {}
            }
        }
        Self {
            default,
            ports,
            every_port,
        }
    }

    /// The decision for `access` to `port` by `client`, without counting it.
    pub fn decide(&self, port: u16, client: Option<&SpiffeId>, access: Access<'_>) -> Decision {
        let caller = Who(client);
        let Some(selected) = self.ports.get(&port).or(self.every_port.as_ref()) else {
            return self.by_default(port, caller, access);
        };
        let allowing = |audit: bool| {
            selected
                .rules
                .iter()
                .filter(|rule| rule.audit == audit)
                .find(|rule| rule.allows(client, access))
        };
        if let Some(rule) = allowing(false) {
            return allow(&rule.allowed);
        }
        if selected.enforced {
            return Decision {
                verdict: Verdict::Deny(format!(
                    "{caller} may not {} on port {port}: no rule of AuthorizationPolicy {} allows it (a port a policy selects allows only what its rules allow)",
                    Describe(access),
                    selected.policies
                )),
                counter: selected.denied.clone(),
            };
        }
        let by_default = self.by_default(port, caller, access);
        if !selected.audited || by_default.verdict != Verdict::Allow {
            return by_default;
        }
        if let Some(rule) = allowing(true) {
            return allow(&rule.allowed);
        }
        Decision {
            verdict: Verdict::AuditDeny(format!(
                "{caller} may not {} on port {port} under AuthorizationPolicy {} (mode Audit)",
                Describe(access),
                selected.policies
            )),
            counter: selected.audit_denied.clone(),
        }
    }

    fn by_default(&self, port: u16, caller: Who<'_>, access: Access<'_>) -> Decision {
        let refuse = |why: &str| Decision {
            verdict: Verdict::Deny(format!(
                "{caller} may not {} on port {port}: {why}",
                Describe(access)
            )),
            counter: self.default.denied.clone(),
        };
        match self.default.policy {
            DefaultPolicy::AllUnauthenticated => allow(&self.default.allowed),
            DefaultPolicy::AllMeshed if caller.0.is_some() => allow(&self.default.allowed),
            DefaultPolicy::AllMeshed => refuse("the namespace default is all-meshed; call through the mesh (mTLS), or allow unauthenticated callers in an AuthorizationPolicy"),
            DefaultPolicy::Deny => refuse("the namespace default is deny and no AuthorizationPolicy selects this port; add one that allows the caller"),
        }
    }
}

fn allow(counter: &IntCounter) -> Decision {
    Decision {
        verdict: Verdict::Allow,
        counter: counter.clone(),
    }
}

fn default_name(policy: DefaultPolicy) -> &'static str {
    match policy {
        DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
        DefaultPolicy::AllMeshed => "all-meshed",
        DefaultPolicy::Deny => "deny",
    }
}

fn compile_caller(caller: trellis_proto::discovery::Caller) -> Option<CallerMatch> {
    Some(match caller.kind? {
        caller::Kind::Identity(id) => match id.parse() {
            Ok(id) => CallerMatch::Identity(id),
            Err(error) => {
                // The controller validated it; allow nobody if it did not.
                tracing::warn!(%error, "ignoring an unusable caller in the inbound policy");
                return None;
            }
        },
        caller::Kind::Namespace(namespace) => CallerMatch::Namespace(namespace),
        caller::Kind::Meshed(_) => CallerMatch::Meshed,
        caller::Kind::Unauthenticated(_) => CallerMatch::Anyone,
    })
}

impl Rule {
    fn allows(&self, client: Option<&SpiffeId>, access: Access<'_>) -> bool {
        let caller = self.callers.iter().any(|c| match (c, client) {
            (CallerMatch::Anyone, _) => true,
            (CallerMatch::Meshed, Some(_)) => true,
            (CallerMatch::Identity(id), Some(client)) => id == client,
            (CallerMatch::Namespace(ns), Some(client)) => *ns == client.namespace,
            _ => false,
        });
        caller
            && match access {
                _ if self.http.is_empty() => true,
                // A rule about paths and methods says nothing about TCP.
                Access::Connection => false,
                Access::Http { method, path } => self.http.iter().any(|m| m.matches(method, path)),
            }
    }
}

impl HttpMatch {
    fn matches(&self, method: &Method, path: &str) -> bool {
        let method_ok =
            self.methods.is_empty() || self.methods.iter().any(|m| m == method.as_str());
        let path_ok = self.paths.is_empty()
            || self
                .paths
                .iter()
                .any(|(exact, value)| path_matches(*exact, value, path));
        method_ok && path_ok
    }
}

/// Gateway API path semantics: `PathPrefix` matches whole segments
/// (`/api` matches `/api` and `/api/x`, not `/apix`).
fn path_matches(exact: bool, value: &str, path: &str) -> bool {
    if exact {
        return path == value;
    }
    let prefix = value.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The caller, as a denial names it.
#[derive(Clone, Copy)]
struct Who<'a>(Option<&'a SpiffeId>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("a client without a mesh identity (plaintext)"),
        }
    }
}

/// What was asked for, as a denial names it.
struct Describe<'a>(Access<'a>);

impl std::fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Access::Http { method, path } => write!(f, "{method} {path}"),
            Access::Connection => f.write_str("open a TCP connection"),
        }
    }
}

#[cfg(test)]
mod tests;
