//! Checks on HTTPRoutes and HTTPFaults before they may serve: each problem
//! names the field and what to write instead. GRPCRoutes: `grpc`.

mod grpc;
pub use grpc::{check_grpc_fields, validate_grpc_route};

use super::manifest::{Lookup, References};
use crate::model::{
    HttpFault, HttpPathModifier, HttpRequestMirror, HttpRequestRedirect, HttpRoute,
    HttpRouteFilter, HttpRouteRule, HttpRouteTimeouts, ObjectKey, ParentReference, TRELLIS_GROUP,
};
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

/// Every check of a route, first problem first. A backend that does not
/// exist refuses the route only if it would get traffic: one of weight 0
/// is reported in the route's status and changes nothing.
pub fn validate_route(route: &HttpRoute, references: &References) -> Result<(), RouteRefusal> {
    for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
        check_parent(route, parent, references)?;
    }
    if let Some(unresolved) = unresolved_refs(route, references).find(|u| u.carries_traffic) {
        return Err(unresolved.refusal);
    }
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

/// A backendRef (or mirror) that names no Service that exists.
pub struct Unresolved {
    pub refusal: RouteRefusal,
    /// False for a backend of weight 0, which gets no request.
    pub carries_traffic: bool,
}

/// The backendRefs (and mirrors) that do not resolve, in order.
pub fn unresolved_refs<'a>(
    route: &'a HttpRoute,
    references: &'a References,
) -> impl Iterator<Item = Unresolved> + 'a {
    let ns = route.metadata.key().namespace;
    route.spec.rules.iter().enumerate().flat_map(move |(i, rule)| {
        let backends = rule.backend_refs.iter().enumerate().map(move |(j, b)| {
            let at = format!("spec.rules[{i}].backendRefs[{j}]");
            (at, &b.group, &b.kind, &b.name, &b.namespace, b.weight != Some(0))
        });
        let mirrors = rule.filters.iter().enumerate().filter_map(move |(j, f)| {
            let b = &f.request_mirror.as_ref()?.backend_ref;
            let at = format!("spec.rules[{i}].filters[{j}].requestMirror.backendRef");
            Some((at, &b.group, &b.kind, &b.name, &b.namespace, true))
        });
        let ns = ns.clone();
        backends
            .chain(mirrors)
            .filter_map(move |(at, group, kind, name, namespace, carries_traffic)| {
                let refusal = if kind.as_deref().is_some_and(|k| k != "Service")
                    || group.as_deref().is_some_and(|g| !g.is_empty())
                {
                    RouteRefusal::InvalidKind(format!(
                        "{at}: only Service backends are supported (group \"\", kind Service)"
                    ))
                } else {
                    let key = ObjectKey::new(namespace.as_deref().unwrap_or(&ns), name);
                    if references.exists("Service", &key) {
                        return None;
                    }
                    RouteRefusal::BackendNotFound(format!(
                        "{at}: backendRef {name:?} names no Service in namespace {}; create the Service or fix the name",
                        key.namespace
                    ))
                };
                Some(Unresolved {
                    refusal,
                    carries_traffic,
                })
            })
    })
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
            check_backend_filters(&at(&format!("backendRefs[{j}].filters")), &b.filters)?;
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
        check_backend_timeout(&at("timeouts"), rule.timeouts.as_ref())?;
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
                "RequestHeaderModifier" | "ResponseHeaderModifier" => {
                    check_header_modifier(&at, filter)?;
                }
                "RequestRedirect" => {
                    let Some(redirect) = &filter.request_redirect else {
                        return Err(format!("{at}: type RequestRedirect needs requestRedirect"));
                    };
                    check_redirect(&at, redirect)?;
                    if let Some(path) = &redirect.path {
                        check_path_modifier(&format!("{at}.requestRedirect.path"), path, rule)?;
                    }
                    if !rule.backend_refs.is_empty() {
                        return Err(format!("{at}: a RequestRedirect rule answers the request itself, so it takes no backendRefs; remove them or the redirect"));
                    }
                }
                "URLRewrite" => {
                    let Some(rewrite) = &filter.url_rewrite else {
                        return Err(format!("{at}: type URLRewrite needs urlRewrite"));
                    };
                    if let Some(hostname) = &rewrite.hostname {
                        check_hostname(&format!("{at}.urlRewrite.hostname"), hostname)?;
                    }
                    if let Some(path) = &rewrite.path {
                        check_path_modifier(&format!("{at}.urlRewrite.path"), path, rule)?;
                    }
                }
                "RequestMirror" => {
                    let Some(mirror) = &filter.request_mirror else {
                        return Err(format!("{at}: type RequestMirror needs requestMirror"));
                    };
                    check_mirror(&at, mirror)?;
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
                other => return Err(format!("{at}: filter type {other:?} is not supported; use RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror or ExtensionRef (HTTPFault, ResiliencePolicy)")),
            }
        }
        check_filter_combination(&at("filters"), &rule.filters)?;
    }
    Ok(())
}

/// The filters that may appear once per rule (or backend), and the pair
/// that may not appear together.
fn check_filter_combination(at: &str, filters: &[HttpRouteFilter]) -> Result<(), String> {
    for once in [
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
    ] {
        let mut of_kind = filters.iter().enumerate().filter(|(_, f)| f.kind == once);
        if let (Some((first, _)), Some((second, _))) = (of_kind.next(), of_kind.next()) {
            return Err(format!(
                "{at}[{second}]: a rule takes one {once} filter, and {at}[{first}] is one already; merge them"
            ));
        }
    }
    let position = |kind: &str| filters.iter().position(|f| f.kind == kind);
    if let (Some(redirect), Some(rewrite)) = (position("RequestRedirect"), position("URLRewrite")) {
        return Err(format!(
            "{at}[{}]: RequestRedirect and URLRewrite ({at}[{redirect}], {at}[{rewrite}]) may not share a rule; keep one",
            redirect.max(rewrite)
        ));
    }
    Ok(())
}

fn check_header_modifier(at: &str, filter: &HttpRouteFilter) -> Result<(), String> {
    let (field, modifier) = match filter.kind.as_str() {
        "RequestHeaderModifier" => ("requestHeaderModifier", &filter.request_header_modifier),
        _ => ("responseHeaderModifier", &filter.response_header_modifier),
    };
    let Some(m) = modifier else {
        return Err(format!("{at}: type {} needs {field}", filter.kind));
    };
    for h in m.set.iter().chain(&m.add) {
        if http::HeaderValue::from_str(&h.value).is_err() {
            return Err(format!(
                "{at}.{field}: the value of {:?} is not a valid header value (visible ASCII, no line breaks)",
                h.name
            ));
        }
    }
    let names = m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove);
    for name in names {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{at}: {name:?} is not a valid header name"));
        }
    }
    Ok(())
}

/// A backend's own filters: only the header modifiers are supported there.
fn check_backend_filters(at: &str, filters: &[HttpRouteFilter]) -> Result<(), String> {
    for (k, filter) in filters.iter().enumerate() {
        let at = format!("{at}[{k}]");
        match filter.kind.as_str() {
            "RequestHeaderModifier" | "ResponseHeaderModifier" => {
                check_header_modifier(&at, filter)?
            }
            other => {
                return Err(format!(
                    "{at}: filter type {other:?} is not supported on one backend; use RequestHeaderModifier or ResponseHeaderModifier there, or move it to the rule's filters (it then applies to all its backends)"
                ))
            }
        }
    }
    check_filter_combination(at, filters)
}

fn check_redirect(at: &str, redirect: &HttpRequestRedirect) -> Result<(), String> {
    if let Some(scheme) = redirect.scheme.as_deref() {
        if !matches!(scheme, "http" | "https") {
            return Err(format!(
                "{at}.requestRedirect.scheme: {scheme:?} is not http or https"
            ));
        }
    }
    if let Some(hostname) = &redirect.hostname {
        check_hostname(&format!("{at}.requestRedirect.hostname"), hostname)?;
    }
    if redirect.port == Some(0) {
        return Err(format!(
            "{at}.requestRedirect.port: 0 is not a port (1-65535)"
        ));
    }
    if let Some(code) = redirect.status_code {
        if !matches!(code, 301 | 302 | 303 | 307 | 308) {
            return Err(format!(
                "{at}.requestRedirect.statusCode: {code} is not 301, 302, 303, 307 or 308"
            ));
        }
    }
    Ok(())
}

/// A precise hostname (no wildcard, no port), as Location and Host take it.
fn check_hostname(at: &str, hostname: &str) -> Result<(), String> {
    let valid = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!(
            "{at}: {hostname:?} is not a hostname like example.org (no port, no wildcard)"
        ));
    }
    Ok(())
}

fn check_path_modifier(
    at: &str,
    path: &HttpPathModifier,
    rule: &HttpRouteRule,
) -> Result<(), String> {
    let absolute = |field: &str, value: &str| {
        if !value.starts_with('/') {
            Err(format!("{at}.{field}: {value:?} must start with /"))
        } else if value.contains(['?', '#']) || value.parse::<http::uri::PathAndQuery>().is_err() {
            Err(format!(
                "{at}.{field}: {value:?} is not a URL path (no query, fragment, spaces or control characters; percent-encode them)"
            ))
        } else {
            Ok(())
        }
    };
    match path.kind.as_str() {
        "ReplaceFullPath" => {
            let Some(full) = &path.replace_full_path else {
                return Err(format!("{at}: type ReplaceFullPath needs replaceFullPath"));
            };
            absolute("replaceFullPath", full)
        }
        "ReplacePrefixMatch" => {
            let Some(prefix) = &path.replace_prefix_match else {
                return Err(format!(
                    "{at}: type ReplacePrefixMatch needs replacePrefixMatch"
                ));
            };
            if !prefix.is_empty() {
                absolute("replacePrefixMatch", prefix)?;
            }
            // The prefix replaced is the one matched, so there must be
            // exactly one (no matches means the default, PathPrefix /).
            let one_prefix = match rule.matches.as_slice() {
                [] => true,
                [only] => only.path.as_ref().is_none_or(|p| p.kind == "PathPrefix"),
                _ => false,
            };
            if !one_prefix {
                return Err(format!(
                    "{at}: ReplacePrefixMatch replaces the matched prefix, so the rule needs exactly one match, of type PathPrefix; use ReplaceFullPath or split the rule"
                ));
            }
            Ok(())
        }
        other => Err(format!(
            "{at}.type: {other:?} is not ReplaceFullPath or ReplacePrefixMatch"
        )),
    }
}

fn check_mirror(at: &str, mirror: &HttpRequestMirror) -> Result<(), String> {
    // Its kind and existence are `check_backend_refs`'s.
    if mirror.backend_ref.port.is_none() {
        return Err(format!(
            "{at}.requestMirror.backendRef.port: a Service backend needs its port"
        ));
    }
    if mirror.percent.is_some() && mirror.fraction.is_some() {
        return Err(format!(
            "{at}.requestMirror: give percent or fraction, not both"
        ));
    }
    if let Some(percent) = mirror.percent.filter(|p| !(0..=100).contains(p)) {
        return Err(format!(
            "{at}.requestMirror.percent: {percent} is not 0-100"
        ));
    }
    if let Some(f) = &mirror.fraction {
        if f.denominator() <= 0 || f.numerator < 0 || f.numerator > f.denominator() {
            return Err(format!(
                "{at}.requestMirror.fraction: {}/{} is not a fraction between 0 and 1 (numerator 0 to denominator, denominator > 0)",
                f.numerator,
                f.denominator()
            ));
        }
    }
    Ok(())
}

/// `backendRequest` bounds one attempt, so it may not exceed `request`
/// (which bounds them all), unless `request` is 0 (no limit).
fn check_backend_timeout(at: &str, timeouts: Option<&HttpRouteTimeouts>) -> Result<(), String> {
    let Some(raw) = timeouts.and_then(|t| t.backend_request.as_deref()) else {
        return Ok(());
    };
    let Some(backend) = parse_gateway_duration(raw) else {
        return Err(format!(
            "{at}.backendRequest: {raw:?} is not a duration like 2s or 500ms"
        ));
    };
    let request = timeouts
        .and_then(|t| t.request.as_deref())
        .and_then(parse_gateway_duration);
    if let Some(request) = request.filter(|r| !r.is_zero() && backend > *r) {
        return Err(format!(
            "{at}.backendRequest: {raw:?} is longer than timeouts.request ({request:?}), which covers every attempt; make it at most the request timeout"
        ));
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
