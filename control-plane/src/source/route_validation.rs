//! Checks on HTTPRoutes and HTTPFaults before they may serve: each problem
//! names the field and what to write instead.

use super::manifest::{Lookup, References};
use crate::model::{HttpFault, HttpRoute, ObjectKey, ParentReference, TRELLIS_GROUP};
use crate::store::parse_gateway_duration;

/// Why a route cannot serve (as it is), sorted by the Gateway API
/// condition that reports it: `Accepted` for the route itself,
/// `ResolvedRefs` for what it refers to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    /// Accepted=False, reason NoMatchingParent.
    #[error("{0}")]
    NoMatchingParent(String),
    /// Accepted=False, reason UnsupportedValue: a field Trellis does not
    /// implement, or a value that is not valid.
    #[error("{0}")]
    UnsupportedValue(String),
    /// ResolvedRefs=False, reason InvalidKind.
    #[error("{0}")]
    InvalidKind(String),
    /// ResolvedRefs=False, reason BackendNotFound.
    #[error("{0}")]
    BackendNotFound(String),
}

/// Every check of a route, first problem first.
pub fn validate_route(route: &HttpRoute, references: &References) -> Result<(), RouteRefusal> {
    for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
        check_parent(route, parent, references)?;
    }
    check_backend_refs(route, references)?;
    check_fields(route, references)
}

/// Whether `parent` exists, so the route can attach to it.
pub fn check_parent(
    route: &HttpRoute,
    parent: &ParentReference,
    references: &References,
) -> Result<(), RouteRefusal> {
    let ns = route.metadata.key().namespace;
    let key = ObjectKey::new(parent.namespace.as_deref().unwrap_or(&ns), &parent.name);
    if references.exists("Service", &key) {
        return Ok(());
    }
    Err(RouteRefusal::NoMatchingParent(format!(
        "parentRef Service {key} does not exist; create it or fix the name"
    )))
}

/// Whether every backendRef names a Service that exists.
pub fn check_backend_refs(route: &HttpRoute, references: &References) -> Result<(), RouteRefusal> {
    let ns = route.metadata.key().namespace;
    for (i, rule) in route.spec.rules.iter().enumerate() {
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("spec.rules[{i}].backendRefs[{j}]");
            if b.kind.as_deref().is_some_and(|k| k != "Service")
                || b.group.as_deref().is_some_and(|g| !g.is_empty())
            {
                return Err(RouteRefusal::InvalidKind(format!(
                    "{at}: only Service backends are supported (group \"\", kind Service)"
                )));
            }
            let key = ObjectKey::new(b.namespace.as_deref().unwrap_or(&ns), &b.name);
            if !references.exists("Service", &key) {
                return Err(RouteRefusal::BackendNotFound(format!(
                    "{at}: backendRef {:?} names no Service in namespace {}; create the Service or fix the name",
                    b.name, key.namespace
                )));
            }
        }
    }
    Ok(())
}

/// The route's own fields: what Trellis implements, with valid values.
pub fn check_fields(route: &HttpRoute, references: &References) -> Result<(), RouteRefusal> {
    fields(route, references).map_err(RouteRefusal::UnsupportedValue)
}

fn fields(route: &HttpRoute, references: &References) -> Result<(), String> {
    let ns = route.metadata.key().namespace;
    if !route.spec.parent_refs.iter().any(|p| p.is_service()) {
        return Err("spec.parentRefs names no Service (group \"\", kind Service); a mesh route attaches to the Service it routes".into());
    }
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let at = |field: &str| format!("spec.rules[{i}].{field}");
        for (j, b) in rule.backend_refs.iter().enumerate() {
            if !b.filters.is_empty() {
                return Err(format!(
                    "{}.filters: filters on one backend are not supported yet; \
                     move them to the rule's filters (they then apply to all its backends) \
                     or split the rule",
                    at(&format!("backendRefs[{j}]"))
                ));
            }
            if b.weight.is_some_and(|w| w > 1_000_000) {
                return Err(format!(
                    "{}: weight must be 0-1000000",
                    at(&format!("backendRefs[{j}]"))
                ));
            }
        }
        if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == Some(0)) {
            return Err(format!(
                "{}: every weight is 0, so no request could be routed; give a backend a weight > 0",
                at("backendRefs")
            ));
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let at = |field: &str| at(&format!("matches[{j}].{field}"));
            if let Some(path) = &m.path {
                match path.kind.as_str() {
                    "Exact" | "PathPrefix" if !path.value.starts_with('/') => {
                        return Err(format!(
                            "{}: {:?} must start with /",
                            at("path.value"),
                            path.value
                        ));
                    }
                    "Exact" | "PathPrefix" => {}
                    "RegularExpression" => check_regex(&path.value)
                        .map_err(|e| format!("{}: {e}", at("path.value")))?,
                    other => {
                        return Err(format!(
                            "{}: {other:?} is not Exact, PathPrefix or RegularExpression",
                            at("path.type")
                        ))
                    }
                }
            }
            for (k, h) in m.headers.iter().chain(&m.query_params).enumerate() {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err(format!(
                        "{}: {:?} is not a valid name",
                        at(&format!("headers/queryParams[{k}].name")),
                        h.name
                    ));
                }
                match h.kind.as_str() {
                    "Exact" => {}
                    "RegularExpression" => check_regex(&h.value).map_err(|e| {
                        format!("{}: {e}", at(&format!("headers/queryParams[{k}].value")))
                    })?,
                    other => {
                        return Err(format!(
                            "{}: {other:?} is not Exact or RegularExpression",
                            at(&format!("headers/queryParams[{k}].type"))
                        ))
                    }
                }
            }
            if let Some(method) = &m.method {
                if http::Method::from_bytes(method.as_bytes()).is_err()
                    || method.chars().any(|c| c.is_ascii_lowercase())
                {
                    return Err(format!(
                        "{}: {method:?} is not an HTTP method (GET, POST, …)",
                        at("method")
                    ));
                }
            }
        }
        if let Some(request) = rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
            if parse_gateway_duration(request).is_none() {
                return Err(format!(
                    "{}: {request:?} is not a duration like 2s or 500ms",
                    at("timeouts.request")
                ));
            }
        }
        if let Some(retry) = &rule.retry {
            if retry.attempts.is_some_and(|a| a > 10) {
                return Err(format!("{}: at most 10 attempts", at("retry.attempts")));
            }
            if let Some(code) = retry.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(format!(
                    "{}: {code} is not a 4xx/5xx status",
                    at("retry.codes")
                ));
            }
            if let Some(backoff) = retry.backoff.as_deref() {
                if parse_gateway_duration(backoff).is_none() {
                    return Err(format!(
                        "{}: {backoff:?} is not a duration like 100ms",
                        at("retry.backoff")
                    ));
                }
            }
        }
        // The filter that named this rule's ResiliencePolicy.
        let mut policy_filter = None;
        for (j, filter) in rule.filters.iter().enumerate() {
            let at = at(&format!("filters[{j}]"));
            match filter.kind.as_str() {
                "RequestHeaderModifier" => {
                    let Some(m) = &filter.request_header_modifier else {
                        return Err(format!("{at}: type RequestHeaderModifier needs requestHeaderModifier"));
                    };
                    let names = m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove);
                    for name in names {
                        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                            return Err(format!("{at}: {name:?} is not a valid header name"));
                        }
                    }
                }
                "ExtensionRef" => {
                    let Some(r) = &filter.extension_ref else {
                        return Err(format!("{at}: type ExtensionRef needs extensionRef"));
                    };
                    let key = ObjectKey::new(&ns, &r.name);
                    match (r.group.as_str(), r.kind.as_str()) {
                        (TRELLIS_GROUP, "HTTPFault") => {
                            if !references.exists("HTTPFault", &key) {
                                return Err(format!("{at}: HTTPFault {key} does not exist"));
                            }
                        }
                        (TRELLIS_GROUP, "ResiliencePolicy") => {
                            match references.policy(&key) {
                                Lookup::Missing => {
                                    return Err(format!("{at}: ResiliencePolicy {key} does not exist"))
                                }
                                Lookup::Found(policy) if policy.spec.outlier_detection.is_some() => {
                                    return Err(format!("{at}: ResiliencePolicy {key} sets outlierDetection, which applies per Service through its spec.targetRefs, not per route rule; reference a policy with only circuitBreaker"));
                                }
                                Lookup::Found(_) | Lookup::Unknown => {}
                            }
                            if let Some(first) = policy_filter.replace(j) {
                                return Err(format!("{at}: a rule takes one ResiliencePolicy, and filters[{first}] already names one"));
                            }
                        }
                        _ => return Err(format!("{at}: extensionRef {}/{} is not supported; use group trellis.dev, kind HTTPFault or ResiliencePolicy", r.group, r.kind)),
                    }
                }
                other => return Err(format!("{at}: filter type {other:?} is not supported; use RequestHeaderModifier or ExtensionRef (HTTPFault, ResiliencePolicy)")),
            }
        }
    }
    Ok(())
}

fn check_regex(pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern)
        .map(drop)
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

pub fn validate_fault(fault: &HttpFault) -> Result<(), String> {
    let percent_ok = |p: f64| (0.0..=100.0).contains(&p);
    if let Some(abort) = &fault.spec.abort {
        if !(200..=599).contains(&abort.http_status) {
            return Err(format!(
                "spec.abort.httpStatus {} is not 200-599",
                abort.http_status
            ));
        }
        if !percent_ok(abort.percent) {
            return Err(format!("spec.abort.percent {} is not 0-100", abort.percent));
        }
    }
    if let Some(delay) = &fault.spec.delay {
        if parse_gateway_duration(&delay.fixed_delay).is_none() {
            return Err(format!(
                "spec.delay.fixedDelay {:?} is not a duration like 200ms",
                delay.fixed_delay
            ));
        }
        if !percent_ok(delay.percent) {
            return Err(format!("spec.delay.percent {} is not 0-100", delay.percent));
        }
    }
    if fault.spec.abort.is_none() && fault.spec.delay.is_none() {
        return Err("spec has neither abort nor delay".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
