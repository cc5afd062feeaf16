//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! See the SPIFFE ID spec: <https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>.

use std::fmt;
use std::str::FromStr;

/// The identity of a workload: its trust domain, namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a Trellis workload SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a workload SPIFFE ID: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>)")]
pub struct InvalidSpiffeId {
    pub input: String,
    pub reason: &'static str,
}

/// Where the controller runs unless told otherwise: the chart's namespace
/// and service account. Its serving certificate names them, and proxies
/// expect them, so both sides default from here.
pub const CONTROLLER_NAMESPACE: &str = "trellis";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "trellis-controller";

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The controller's identity in `trust_domain` when it runs as the chart
    /// installs it.
    pub fn default_controller(trust_domain: &str) -> Self {
        Self::new(
            trust_domain,
            CONTROLLER_NAMESPACE,
            CONTROLLER_SERVICE_ACCOUNT,
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| InvalidSpiffeId {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it does not start with spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| err("it has no path"))?;
        let valid_domain = !trust_domain.is_empty()
            && trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
            });
        if !valid_domain {
            return Err(err(
                "the trust domain must be lowercase letters, digits, '-', '.' or '_'",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if valid_segment(ns) && valid_segment(sa) => {
                Ok(Self::new(trust_domain, ns, sa))
            }
            _ => Err(err("the path is not /ns/<namespace>/sa/<serviceaccount>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/hello"
            .parse()
            .unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "hello"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/hello");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe:///ns/a/sa/b",
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err();
            assert!(
                err.to_string().contains("expected spiffe://"),
                "{bad}: {err}"
            );
        }
    }
}
