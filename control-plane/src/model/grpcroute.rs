//! Gateway API `GRPCRoute` attached to a Service (GAMMA).
//!
//! gRPC is HTTP/2 POSTs to `/package.Service/Method`, so a GRPCRoute says
//! nothing an HTTPRoute could not: [`GrpcRoute::to_http`] rewrites its
//! matches as path matches and the rest carries over, and from there one
//! validation, one compiler and one data path serve both kinds.

use serde::{Deserialize, Serialize};

use super::httproute::{
    BackendRef, HttpHeaderMatch, HttpPathMatch, HttpRoute, HttpRouteFilter, HttpRouteMatch,
    HttpRouteRule, HttpRouteSpec, ParentReference, GATEWAY_API_VERSION,
};
use super::ObjectMeta;

/// `gateway.networking.k8s.io/v1/GRPCRoute`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcRoute {
    #[serde(rename = "apiVersion", default = "gateway_api_version")]
    pub api_version: String,
    #[serde(default = "grpcroute_kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

fn gateway_api_version() -> String {
    GATEWAY_API_VERSION.into()
}

fn grpcroute_kind() -> String {
    "GRPCRoute".into()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Read but not used, as for HTTPRoutes (GEP-1294).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// RequestHeaderModifier, ResponseHeaderModifier, RequestMirror and
    /// ExtensionRef (GRPCRoute has no redirects or rewrites).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type", default = "exact")]
    pub kind: String,
    /// `package.Service`; any service when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Any method when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

fn exact() -> String {
    "Exact".into()
}

impl GrpcMethodMatch {
    /// The path match of the requests this matches: service and method
    /// exactly is that one path; a service alone is its path prefix (whole
    /// segments, so `/pkg.Svc` is not `/pkg.SvcX`); anything else is a
    /// regular expression over `/service/method`.
    fn path(&self) -> HttpPathMatch {
        let exact = self.kind == "Exact";
        let path = |kind: &str, value: String| HttpPathMatch {
            kind: kind.into(),
            value,
        };
        match (self.service.as_deref(), self.method.as_deref()) {
            (Some(s), Some(m)) if exact => path("Exact", format!("/{s}/{m}")),
            (Some(s), None) if exact => path("PathPrefix", format!("/{s}")),
            (None, None) => path("PathPrefix", "/".into()),
            (service, method) => {
                let part = |p: Option<&str>| match p {
                    None => "[^/]+".to_string(),
                    Some(p) if exact => regex::escape(p),
                    Some(p) => format!("(?:{p})"),
                };
                path(
                    "RegularExpression",
                    format!("/{}/{}", part(service), part(method)),
                )
            }
        }
    }
}

impl GrpcRoute {
    /// The HTTPRoute that routes exactly as this route does (same name,
    /// parents and backends).
    pub fn to_http(&self) -> HttpRoute {
        let rules = self
            .spec
            .rules
            .iter()
            .map(|rule| HttpRouteRule {
                name: rule.name.clone(),
                matches: rule
                    .matches
                    .iter()
                    .map(|m| HttpRouteMatch {
                        path: Some(m.method.as_ref().map_or_else(
                            || HttpPathMatch {
                                kind: "PathPrefix".into(),
                                value: "/".into(),
                            },
                            GrpcMethodMatch::path,
                        )),
                        headers: m.headers.clone(),
                        ..HttpRouteMatch::default()
                    })
                    .collect(),
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                ..HttpRouteRule::default()
            })
            .collect();
        HttpRoute {
            api_version: self.api_version.clone(),
            kind: "HTTPRoute".into(),
            metadata: self.metadata.clone(),
            spec: HttpRouteSpec {
                parent_refs: self.spec.parent_refs.clone(),
                hostnames: self.spec.hostnames.clone(),
                rules,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(kind: &str, service: Option<&str>, method: Option<&str>) -> HttpPathMatch {
        GrpcMethodMatch {
            kind: kind.into(),
            service: service.map(Into::into),
            method: method.map(Into::into),
        }
        .path()
    }

    #[test]
    fn method_matches_become_path_matches() {
        let cases = [
            (
                method("Exact", Some("echo.Echo"), Some("Say")),
                ("Exact", "/echo.Echo/Say"),
            ),
            (
                method("Exact", Some("echo.Echo"), None),
                ("PathPrefix", "/echo.Echo"),
            ),
            (
                method("Exact", None, Some("Say.It")),
                ("RegularExpression", "/[^/]+/Say\\.It"),
            ),
            (
                method("RegularExpression", Some("echo\\..*"), Some("S.*")),
                ("RegularExpression", "/(?:echo\\..*)/(?:S.*)"),
            ),
            (method("Exact", None, None), ("PathPrefix", "/")),
        ];
        for (got, (kind, value)) in cases {
            assert_eq!((got.kind.as_str(), got.value.as_str()), (kind, value));
        }
    }
}
