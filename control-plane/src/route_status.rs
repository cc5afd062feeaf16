//! Route status as Gateway API implementations report it: for each parent
//! Service, whether the route is `Accepted` (it attaches and Trellis
//! implements all of it) and whether its references are resolved
//! (`ResolvedRefs`), each with a reason and a message that says what to fix.
//!
//! The same conditions are written to `status.parents[]` in cluster mode
//! (`writer`) and printed by `meshctl route get` in local mode.

mod writer;

use serde::Serialize;

use crate::model::{HttpRoute, Object, ParentReference};
use crate::source::manifest::{self, References};
use crate::source::route_validation::{self, RouteRefusal};

pub use writer::StatusWriter;

/// `status.parents[].controllerName` of the routes Trellis serves.
pub const CONTROLLER_NAME: &str = "trellis.dev/mesh";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `True` or `False`, as Kubernetes conditions spell them.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    fn new(kind: &'static str, ok: bool, reason: &'static str, message: String) -> Self {
        let status = if ok { "True" } else { "False" };
        Self {
            kind,
            status,
            reason,
            message,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// One parent's entry of `status.parents[]`, before the writer adds
/// `observedGeneration` and transition times.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentStatus {
    pub parent_ref: ParentReference,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// What unresolved references do to a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refs {
    /// Local mode: the file is refused whole and its last good version
    /// serves, so the route is not accepted either.
    Refuse,
    /// Cluster mode: the API server takes the route and it serves; a
    /// request for a backend that does not exist fails.
    Report,
}

/// The status of a route (HTTPRoute or GRPCRoute) read from a manifest or
/// the API server (as JSON): one refused before it became a route (a field Trellis does not
/// implement) is not accepted by any of the Service parents it names.
pub fn status_of_document(
    document: &serde_json::Value,
    references: &References,
    refs: Refs,
) -> Vec<ParentStatus> {
    match manifest::from_value(document.clone()) {
        Ok(Some(Object::HttpRoute(route))) => status(&route, references, refs),
        Ok(Some(Object::GrpcRoute(route))) => {
            let mut parents = status(&route.to_http(), references, refs);
            if let Err(refusal) = route_validation::check_grpc_fields(&route) {
                let refused =
                    Condition::new("Accepted", false, reason(&refusal), refusal.to_string());
                for parent in parents.iter_mut().filter(|p| p.accepted.is_true()) {
                    parent.accepted = refused.clone();
                }
            }
            parents
        }
        Ok(_) => Vec::new(),
        Err(refusal) => {
            let parents: Vec<ParentReference> = document
                .pointer("/spec/parentRefs")
                .and_then(|p| serde_json::from_value(p.clone()).ok())
                .unwrap_or_default();
            let refused = Condition::new("Accepted", false, "UnsupportedValue", refusal.reason);
            parents
                .into_iter()
                .filter(ParentReference::is_service)
                .map(|parent_ref| ParentStatus {
                    parent_ref,
                    accepted: refused.clone(),
                    resolved_refs: Condition::new(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "not checked: the route itself was refused".into(),
                    ),
                })
                .collect()
        }
    }
}

/// The status of `route` for each Service among its parents.
pub fn status(route: &HttpRoute, references: &References, refs: Refs) -> Vec<ParentStatus> {
    let unresolved: Vec<_> = route_validation::unresolved_refs(route, references).collect();
    let resolved = match unresolved.first() {
        None => Condition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved".into(),
        ),
        Some(u) => Condition::new(
            "ResolvedRefs",
            false,
            reason(&u.refusal),
            u.refusal.to_string(),
        ),
    };
    // What a manifest directory refuses: references that would get traffic.
    let blocking = unresolved.iter().find(|u| u.carries_traffic);
    let fields = route_validation::check_fields(route, references);
    route
        .spec
        .parent_refs
        .iter()
        .filter(|p| p.is_service())
        .map(|parent| {
            let problem = route_validation::check_parent(route, parent, references)
                .and(fields.clone())
                .err();
            let accepted = match problem {
                Some(refusal) => Condition::new("Accepted", false, reason(&refusal), refusal.to_string()),
                None if refs == Refs::Refuse && blocking.is_some() => Condition::new(
                    "Accepted",
                    false,
                    "UnresolvedRefs",
                    format!(
                        "not applied until its references resolve (the last good version of its file serves): {}",
                        blocking.map_or(String::new(), |u| u.refusal.to_string())
                    ),
                ),
                None => Condition::new(
                    "Accepted",
                    true,
                    "Accepted",
                    "the route applies to this Service's clients".into(),
                ),
            };
            ParentStatus {
                parent_ref: parent.clone(),
                accepted,
                resolved_refs: resolved.clone(),
            }
        })
        .collect()
}

/// The Gateway API reason of a refusal.
fn reason(refusal: &RouteRefusal) -> &'static str {
    match refusal {
        RouteRefusal::NoMatchingParent(_) => "NoMatchingParent",
        RouteRefusal::UnsupportedValue(_) => "UnsupportedValue",
        RouteRefusal::InvalidKind(_) => "InvalidKind",
        RouteRefusal::BackendNotFound(_) => "BackendNotFound",
    }
}

#[cfg(test)]
mod tests;
