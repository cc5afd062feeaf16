//! Every call the controller makes to the Kubernetes API, as RBAC names
//! it: what the chart's ClusterRole and Role grant, what `meshctl check`
//! asks the API server the controller may do, and what the RBAC test holds
//! the controller's real calls against (it fails on a call not listed here
//! and on a listed permission never used).

use crate::identity::{ISSUER_SECRET, TRUST_ROOTS_CONFIG_MAP};
use crate::lease::LEASE_NAME;

/// Where a permission applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    Cluster,
    /// The controller's own namespace only (a Role).
    ControllerNamespace,
}

/// Verbs on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// API group, `""` for core.
    pub group: &'static str,
    /// Plural resource name, `/subresource` after it for a subresource (as
    /// RBAC rules write it: `rollouts/status`).
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: Scope,
    /// Only these objects (`resourceNames`); empty for any.
    pub names: &'static [&'static str],
}

const WATCH: &[&str] = &["list", "watch"];
/// Read at start (`get`), then watched.
const READ: &[&str] = &["get", "list", "watch"];

const fn watched(group: &'static str, resource: &'static str) -> Permission {
    Permission {
        group,
        resource,
        verbs: WATCH,
        scope: Scope::Cluster,
        names: &[],
    }
}

/// What the controller needs, and nothing more.
pub const PERMISSIONS: &[Permission] = &[
    // The mesh's objects (`source::cluster`).
    watched("", "namespaces"),
    watched("", "services"),
    watched("", "pods"),
    watched("discovery.k8s.io", "endpointslices"),
    watched("gateway.networking.k8s.io", "httproutes"),
    watched("gateway.networking.k8s.io", "grpcroutes"),
    watched("trellis.dev", "httpfaults"),
    watched("trellis.dev", "resiliencepolicies"),
    watched("trellis.dev", "rollouts"),
    watched("trellis.dev", "authorizationpolicies"),
    // Rollouts (`rollout::cluster`): each one's status by merge patch of
    // its subresource, and its HTTPRoute by server-side apply, which is a
    // `patch` and, when the route does not exist yet, a `create`.
    Permission {
        group: "trellis.dev",
        resource: "rollouts/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: &[],
    },
    Permission {
        group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
        names: &[],
    },
    // Routes' conditions (`route_status::writer`), by merge patch of the
    // status subresource.
    Permission {
        group: "gateway.networking.k8s.io",
        resource: "httproutes/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: &[],
    },
    Permission {
        group: "gateway.networking.k8s.io",
        resource: "grpcroutes/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: &[],
    },
    // Proxies' tokens (`identity::token_review`).
    Permission {
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        scope: Scope::Cluster,
        names: &[],
    },
    // The issuer and trust roots (`identity::issuer_source`), by name.
    Permission {
        group: "",
        resource: "secrets",
        verbs: READ,
        scope: Scope::ControllerNamespace,
        names: &[ISSUER_SECRET],
    },
    Permission {
        group: "",
        resource: "configmaps",
        verbs: READ,
        scope: Scope::ControllerNamespace,
        names: &[TRUST_ROOTS_CONFIG_MAP],
    },
    // Leader election (`lease`): a Lease cannot be created by name, so
    // `create` is for any Lease of the namespace.
    Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        scope: Scope::ControllerNamespace,
        names: &[LEASE_NAME],
    },
    Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        scope: Scope::ControllerNamespace,
        names: &[],
    },
];

impl Permission {
    /// Each verb on each named object (on any object when no names are
    /// given): the single grants an access review asks about.
    pub fn grants(&self) -> impl Iterator<Item = (&'static str, Option<&'static str>)> + '_ {
        let names: Vec<Option<&'static str>> = if self.names.is_empty() {
            vec![None]
        } else {
            self.names.iter().copied().map(Some).collect()
        };
        self.verbs
            .iter()
            .flat_map(move |verb| names.clone().into_iter().map(move |name| (*verb, name)))
    }
}
