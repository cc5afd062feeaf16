//! Checks on AuthorizationPolicies (and the namespace default annotation)
//! before they may serve: each problem names the field and what to write
//! instead. A refused policy never half-applies: the file is rejected and
//! the last good configuration keeps serving.

use trellis_proto::SpiffeId;

use crate::model::{
    AuthorizationPolicy, CallerSpec, Namespace, PathSpec, DEFAULT_INBOUND_POLICY_ANNOTATION,
};
use crate::store::DefaultInboundPolicy;

/// Why an AuthorizationPolicy was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// A rule names no caller, so it would allow nobody.
    #[error("spec.allow[{rule}].from is empty; name at least one caller (identity, serviceAccount, namespace, meshed or unauthenticated)")]
    NoCallers { rule: usize },
    /// A caller sets no field or several: which one was meant is unclear.
    #[error("spec.allow[{rule}].from[{caller}] sets {count} of identity, serviceAccount, namespace, meshed, unauthenticated; set exactly one per entry")]
    CallerFields {
        rule: usize,
        caller: usize,
        count: usize,
    },
    /// `meshed: false` or `unauthenticated: false` allows nothing.
    #[error("spec.allow[{rule}].from[{caller}].{field} is false, which allows nobody; set it to true or remove the entry")]
    FalseCaller {
        rule: usize,
        caller: usize,
        field: &'static str,
    },
    /// Not a workload SPIFFE ID.
    #[error("spec.allow[{rule}].from[{caller}].identity: {reason}; write spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadIdentity {
        rule: usize,
        caller: usize,
        reason: String,
    },
    /// An empty name where one is required.
    #[error("spec.allow[{rule}].from[{caller}].{field} is empty; name a {what}")]
    EmptyName {
        rule: usize,
        caller: usize,
        field: &'static str,
        what: &'static str,
    },
    /// A path match of a type other than PathPrefix or Exact.
    #[error("spec.allow[{rule}].to[{to}].paths[{path}].type {kind:?} is not supported; use PathPrefix or Exact")]
    PathType {
        rule: usize,
        to: usize,
        path: usize,
        kind: String,
    },
    /// A path that does not start with `/`.
    #[error("spec.allow[{rule}].to[{to}].paths[{path}].value {value:?} must start with /")]
    PathValue {
        rule: usize,
        to: usize,
        path: usize,
        value: String,
    },
    /// A method that is not an upper-case HTTP token.
    #[error("spec.allow[{rule}].to[{to}].methods[{method}] {value:?} is not an HTTP method; use upper case, e.g. GET")]
    Method {
        rule: usize,
        to: usize,
        method: usize,
        value: String,
    },
    /// A `to` entry with neither paths nor methods matches everything,
    /// which is what leaving `to` out says.
    #[error("spec.allow[{rule}].to[{to}] has neither paths nor methods; remove it (no `to` allows every request)")]
    EmptyTo { rule: usize, to: usize },
    #[error("spec.ports[{index}] is 0; name an application port (1-65535)")]
    ZeroPort { index: usize },
}

pub fn validate_policy(policy: &AuthorizationPolicy) -> Result<(), AuthzError> {
    let spec = &policy.spec;
    if let Some(index) = spec.ports.iter().position(|p| *p == 0) {
        return Err(AuthzError::ZeroPort { index });
    }
    for (rule, allow) in spec.allow.iter().enumerate() {
        if allow.from.is_empty() {
            return Err(AuthzError::NoCallers { rule });
        }
        for (caller, from) in allow.from.iter().enumerate() {
            validate_caller(rule, caller, from)?;
        }
        for (to, request) in allow.to.iter().enumerate() {
            if request.paths.is_empty() && request.methods.is_empty() {
                return Err(AuthzError::EmptyTo { rule, to });
            }
            for (path, p) in request.paths.iter().enumerate() {
                validate_path(rule, to, path, p)?;
            }
            for (method, value) in request.methods.iter().enumerate() {
                let token =
                    !value.is_empty() && value.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
                if !token {
                    return Err(AuthzError::Method {
                        rule,
                        to,
                        method,
                        value: value.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn validate_caller(rule: usize, caller: usize, from: &CallerSpec) -> Result<(), AuthzError> {
    let count = [
        from.identity.is_some(),
        from.service_account.is_some(),
        from.namespace.is_some(),
        from.meshed.is_some(),
        from.unauthenticated.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count();
    if count != 1 {
        return Err(AuthzError::CallerFields {
            rule,
            caller,
            count,
        });
    }
    let empty = |field, what| AuthzError::EmptyName {
        rule,
        caller,
        field,
        what,
    };
    if let Some(identity) = &from.identity {
        identity
            .parse::<SpiffeId>()
            .map_err(|e| AuthzError::BadIdentity {
                rule,
                caller,
                reason: e.to_string(),
            })?;
    }
    if let Some(sa) = &from.service_account {
        if sa.name.is_empty() {
            return Err(empty("serviceAccount.name", "service account"));
        }
        if sa.namespace.as_deref() == Some("") {
            return Err(empty(
                "serviceAccount.namespace",
                "namespace, or leave it out",
            ));
        }
    }
    if from.namespace.as_deref() == Some("") {
        return Err(empty("namespace", "namespace"));
    }
    for (field, value) in [
        ("meshed", from.meshed),
        ("unauthenticated", from.unauthenticated),
    ] {
        if value == Some(false) {
            return Err(AuthzError::FalseCaller {
                rule,
                caller,
                field,
            });
        }
    }
    Ok(())
}

fn validate_path(rule: usize, to: usize, path: usize, p: &PathSpec) -> Result<(), AuthzError> {
    if !matches!(p.match_type.as_str(), "PathPrefix" | "Exact") {
        return Err(AuthzError::PathType {
            rule,
            to,
            path,
            kind: p.match_type.clone(),
        });
    }
    if !p.value.starts_with('/') {
        return Err(AuthzError::PathValue {
            rule,
            to,
            path,
            value: p.value.clone(),
        });
    }
    Ok(())
}

/// The default-inbound-policy annotation, when set, must name a policy.
pub fn validate_namespace(namespace: &Namespace) -> Result<(), String> {
    match namespace
        .metadata
        .annotations
        .get(DEFAULT_INBOUND_POLICY_ANNOTATION)
    {
        Some(value) if value.parse::<DefaultInboundPolicy>().is_err() => Err(format!(
            "annotation {DEFAULT_INBOUND_POLICY_ANNOTATION} = {value:?} is not a policy; use all-unauthenticated, all-meshed or deny"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
