//! What only a GRPCRoute has to pass: its method matches and its filter
//! types; the rest is checked on the HTTPRoute it routes as.

use super::{check_regex, validate_route, RouteRefusal};
use crate::model::{GrpcMethodMatch, GrpcRoute};
use crate::source::manifest::References;

/// A GRPCRoute: its method matches and filter types here, everything else
/// as the HTTPRoute it routes as (the field paths are the same in both).
pub fn validate_grpc_route(route: &GrpcRoute, references: &References) -> Result<(), RouteRefusal> {
    check_grpc_fields(route)?;
    validate_route(&route.to_http(), references)
}

/// What only a GRPCRoute has: method matches, and fewer filter types.
pub fn check_grpc_fields(route: &GrpcRoute) -> Result<(), RouteRefusal> {
    for (i, rule) in route.spec.rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(method) = &m.method {
                let at = format!("spec.rules[{i}].matches[{j}].method");
                check_grpc_method(&at, method).map_err(RouteRefusal::UnsupportedValue)?;
            }
        }
        for (j, filter) in rule.filters.iter().enumerate() {
            let grpc = [
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "ExtensionRef",
            ];
            if !grpc.contains(&filter.kind.as_str()) {
                return Err(RouteRefusal::UnsupportedValue(format!(
                    "spec.rules[{i}].filters[{j}]: filter type {:?} is not one of GRPCRoute's ({}); \
                     redirects and rewrites are HTTPRoute's",
                    filter.kind,
                    grpc.join(", ")
                )));
            }
        }
    }
    Ok(())
}

fn check_grpc_method(at: &str, m: &GrpcMethodMatch) -> Result<(), String> {
    if m.service.is_none() && m.method.is_none() {
        return Err(format!("{at}: give a service, a method or both"));
    }
    let parts = [("service", &m.service), ("method", &m.method)];
    for (field, value) in parts {
        let Some(value) = value else { continue };
        match m.kind.as_str() {
            "Exact" => {
                let name = |c: char| c.is_ascii_alphanumeric() || c == '_';
                let valid = match field {
                    // `package.Service`: dot-separated identifiers.
                    "service" => value
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(name)),
                    _ => !value.is_empty() && value.chars().all(name),
                };
                if !valid {
                    return Err(format!(
                        "{at}.{field}: {value:?} is not a gRPC {field} name (such as package.Service and Method)"
                    ));
                }
            }
            "RegularExpression" => {
                check_regex(value).map_err(|e| format!("{at}.{field}: {e}"))?;
            }
            other => {
                return Err(format!(
                    "{at}.type: {other:?} is not Exact or RegularExpression"
                ))
            }
        }
    }
    Ok(())
}
