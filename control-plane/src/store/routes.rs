//! Turning the HTTPRoutes attached to a Service into the ordered rules a
//! proxy applies.
//!
//! Precedence follows the HTTPRoute spec: an exact path beats a prefix, a
//! longer prefix a shorter one, then a method match, then more header
//! matches, then more query matches; ties go to the older route, then to
//! namespace/name, then to rule order.

use std::borrow::Cow;
use std::time::Duration;

use trellis_proto::discovery::route_match::PathKind;
use trellis_proto::discovery::{
    path_modifier, Backend, Fault, Header, HeaderModifier, Mirror, PathModifier, Redirect, Retry,
    Rewrite, RouteMatch, Routes, Rule, ValueMatch,
};

use super::State;
use crate::model::{
    HttpPathModifier, HttpRequestRedirect, HttpRoute, HttpRouteFilter, HttpRouteMatch,
    HttpRouteRule, ObjectKey, TRELLIS_GROUP,
};

/// Parses a Gateway API duration (`1h`, `2m`, `10s`, `500ms`, or a
/// combination such as `1m30s`).
pub fn parse_gateway_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
    }
    Some(total)
}

/// A rule with the match that selected it, and its sort key.
struct Candidate {
    key: (u8, usize, bool, usize, usize),
    created: String,
    route: ObjectKey,
    rule: usize,
    compiled: Rule,
}

impl State {
    /// The rules a client of `client_namespace` follows for `authority`.
    pub(crate) fn routes_for(&self, authority: &str, client_namespace: &str) -> Routes {
        let Some((service, _, port)) = self.find_service(authority) else {
            return Routes::default();
        };
        let mut attached = self.attached_routes(&service, port, client_namespace);
        attached.sort_by_key(|r| r.metadata.key());
        let mut candidates = Vec::new();
        for route in &attached {
            let route_key = route.metadata.key();
            for (index, rule) in route.spec.rules.iter().enumerate() {
                let default_match = [HttpRouteMatch::default()];
                let matches = if rule.matches.is_empty() {
                    &default_match[..]
                } else {
                    &rule.matches[..]
                };
                for m in matches {
                    let compiled = self.compile(&route_key, index, rule, m, &service, port);
                    candidates.push(Candidate {
                        key: precedence(m),
                        created: route
                            .metadata
                            .creation_timestamp
                            .clone()
                            .unwrap_or_default(),
                        route: route_key.clone(),
                        rule: index,
                        compiled,
                    });
                }
            }
        }
        candidates.sort_by(|a, b| {
            b.key
                .cmp(&a.key)
                .then_with(|| a.created.cmp(&b.created))
                .then_with(|| a.route.cmp(&b.route))
                .then_with(|| a.rule.cmp(&b.rule))
        });
        Routes {
            rules: candidates.into_iter().map(|c| c.compiled).collect(),
            sources: attached
                .iter()
                .map(|r| r.metadata.key().to_string())
                .collect(),
        }
    }

    /// The routes attached to `service` (on `port`) that apply to a client
    /// of `client_namespace`, as GAMMA defines them: a producer route (in
    /// the Service's namespace) applies to every client; a consumer route
    /// (in any other) only to clients of its own namespace, and where a
    /// client has consumer routes for a Service, its producer routes no
    /// longer apply to that client. GRPCRoutes come as the HTTPRoutes they
    /// route as; when both kinds attach, only one kind applies: the kind of
    /// the oldest route (then the first by namespace/name), as Gateway API
    /// says for a listener with both.
    fn attached_routes(
        &self,
        service: &ObjectKey,
        port: u16,
        client_namespace: &str,
    ) -> Vec<Cow<'_, HttpRoute>> {
        let attaches = |route: &HttpRoute| {
            route
                .service_parents()
                .any(|(parent, p)| parent == *service && p.is_none_or(|p| p == port))
        };
        let http = self
            .routes
            .values()
            .filter(|r| attaches(r))
            .map(Cow::Borrowed);
        let grpc = self
            .grpc_routes
            .values()
            .map(|g| g.to_http())
            .filter(attaches)
            .map(Cow::Owned);
        let kinds = [http.collect::<Vec<_>>(), grpc.collect::<Vec<_>>()];
        let [http, grpc] = kinds.map(|routes| {
            let (producer, consumer): (Vec<_>, Vec<_>) = routes
                .into_iter()
                .partition(|r| r.metadata.key().namespace == service.namespace);
            let consumer: Vec<_> = consumer
                .into_iter()
                .filter(|r| r.metadata.key().namespace == client_namespace)
                .collect();
            if consumer.is_empty() {
                producer
            } else {
                consumer
            }
        });
        let oldest = |routes: &[Cow<'_, HttpRoute>]| {
            routes
                .iter()
                .map(|r| {
                    (
                        r.metadata.creation_timestamp.clone().unwrap_or_default(),
                        r.metadata.key(),
                    )
                })
                .min()
        };
        match (oldest(&http), oldest(&grpc)) {
            (Some(h), Some(g)) if g < h => grpc,
            (Some(_), _) => http,
            (None, _) => grpc,
        }
    }

    fn compile(
        &self,
        route: &ObjectKey,
        index: usize,
        rule: &HttpRouteRule,
        m: &HttpRouteMatch,
        parent: &ObjectKey,
        parent_port: u16,
    ) -> Rule {
        let authority =
            |name: &str, ns: &str, port: u16| format!("{name}.{ns}.svc.cluster.local:{port}");
        let mut backends: Vec<Backend> = rule
            .backend_refs
            .iter()
            .map(|b| {
                let ns = b.namespace.as_deref().unwrap_or(&route.namespace);
                Backend {
                    authority: authority(&b.name, ns, b.port.unwrap_or(parent_port)),
                    weight: b.weight.unwrap_or(1),
                    name: b.name.clone(),
                    request_headers: header_modifier(&b.filters, |f| {
                        f.request_header_modifier.as_ref()
                    }),
                    response_headers: header_modifier(&b.filters, |f| {
                        f.response_header_modifier.as_ref()
                    }),
                }
            })
            .collect();
        // No backendRefs: the rule only shapes traffic to the Service itself.
        if backends.is_empty() {
            backends.push(Backend {
                authority: authority(&parent.name, &parent.namespace, parent_port),
                weight: 1,
                name: parent.name.clone(),
                ..Backend::default()
            });
        }
        let (path_kind, path) = match &m.path {
            Some(p) if p.kind == "Exact" => (PathKind::Exact, p.value.clone()),
            Some(p) if p.kind == "RegularExpression" => (PathKind::Regex, p.value.clone()),
            Some(p) => (PathKind::Prefix, p.value.clone()),
            None => (PathKind::Prefix, "/".to_string()),
        };
        let values = |list: &[crate::model::HttpHeaderMatch]| {
            list.iter()
                .map(|h| ValueMatch {
                    name: h.name.clone(),
                    value: h.value.clone(),
                    regex: h.kind == "RegularExpression",
                })
                .collect()
        };
        let mut fault = None;
        let mut resilience = None;
        for filter in &rule.filters {
            if let Some(reference) = &filter.extension_ref {
                if reference.group == TRELLIS_GROUP && reference.kind == "ResiliencePolicy" {
                    resilience =
                        self.rule_resilience(&ObjectKey::new(&route.namespace, &reference.name));
                }
                if reference.group == TRELLIS_GROUP && reference.kind == "HTTPFault" {
                    let key = ObjectKey::new(&route.namespace, &reference.name);
                    fault = self.faults.get(&key).map(|f| Fault {
                        abort_status: f
                            .spec
                            .abort
                            .as_ref()
                            .map_or(0, |a| u32::from(a.http_status)),
                        abort_percent: f.spec.abort.as_ref().map_or(0.0, |a| a.percent),
                        delay_ms: f
                            .spec
                            .delay
                            .as_ref()
                            .and_then(|d| parse_gateway_duration(&d.fixed_delay))
                            .map_or(0, |d| d.as_millis() as u64),
                        delay_percent: f.spec.delay.as_ref().map_or(0.0, |d| d.percent),
                    });
                }
            }
        }
        Rule {
            r#match: Some(RouteMatch {
                path_kind: path_kind as i32,
                path,
                headers: values(&m.headers),
                query_params: values(&m.query_params),
                method: m.method.clone().unwrap_or_default(),
            }),
            backends,
            timeout_ms: rule
                .timeouts
                .as_ref()
                .and_then(|t| t.request.as_deref())
                .and_then(parse_gateway_duration)
                .map_or(0, |d| d.as_millis() as u64),
            retry: rule.retry.as_ref().map(|r| Retry {
                attempts: r.attempts.unwrap_or(1),
                codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                backoff_ms: r
                    .backoff
                    .as_deref()
                    .and_then(parse_gateway_duration)
                    .map_or(0, |d| d.as_millis() as u64),
            }),
            fault,
            request_headers: header_modifier(&rule.filters, |f| f.request_header_modifier.as_ref()),
            route: format!("{route}#{index}"),
            resilience,
            redirect: rule
                .filters
                .iter()
                .find_map(|f| f.request_redirect.as_ref())
                .map(|r| redirect(r, parent_port)),
            rewrite: rule
                .filters
                .iter()
                .find_map(|f| f.url_rewrite.as_ref())
                .map(|r| Rewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().and_then(path_modifier),
                }),
            response_headers: header_modifier(&rule.filters, |f| {
                f.response_header_modifier.as_ref()
            }),
            mirrors: rule
                .filters
                .iter()
                .filter_map(|f| f.request_mirror.as_ref())
                .map(|m| {
                    let b = &m.backend_ref;
                    let ns = b.namespace.as_deref().unwrap_or(&route.namespace);
                    Mirror {
                        backend: Some(Backend {
                            authority: authority(&b.name, ns, b.port.unwrap_or(parent_port)),
                            weight: 1,
                            name: b.name.clone(),
                            ..Backend::default()
                        }),
                        percent: m.share(),
                    }
                })
                .collect(),
            backend_timeout_ms: rule
                .timeouts
                .as_ref()
                .and_then(|t| t.backend_request.as_deref())
                .and_then(parse_gateway_duration)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// The first of `filters`' header modifiers that `pick` selects, in the
/// proxy's form.
fn header_modifier<'a>(
    filters: &'a [HttpRouteFilter],
    pick: impl Fn(&'a HttpRouteFilter) -> Option<&'a crate::model::HeaderModifier>,
) -> Option<HeaderModifier> {
    let modifier = filters.iter().find_map(pick)?;
    let headers = |list: &[crate::model::HttpHeader]| {
        list.iter()
            .map(|h| Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    Some(HeaderModifier {
        set: headers(&modifier.set),
        add: headers(&modifier.add),
        remove: modifier.remove.clone(),
    })
}

/// A redirect with its port resolved as the HTTPRoute spec says: the
/// filter's, else the scheme's well-known port, else the parent Service's
/// (the mesh's "listener").
fn redirect(r: &HttpRequestRedirect, parent_port: u16) -> Redirect {
    let port = match (r.port, r.scheme.as_deref()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, Some("http")) => 80,
        (None, _) => parent_port,
    };
    Redirect {
        scheme: r.scheme.clone().unwrap_or_default(),
        hostname: r.hostname.clone().unwrap_or_default(),
        path: r.path.as_ref().and_then(path_modifier),
        port: u32::from(port),
        status: u32::from(r.status_code.unwrap_or(302)),
    }
}

fn path_modifier(p: &HttpPathModifier) -> Option<PathModifier> {
    let (kind, value) = match p.kind.as_str() {
        "ReplaceFullPath" => (path_modifier::Kind::Full, p.replace_full_path.clone()?),
        "ReplacePrefixMatch" => (path_modifier::Kind::Prefix, p.replace_prefix_match.clone()?),
        _ => return None,
    };
    Some(PathModifier {
        kind: kind as i32,
        value,
    })
}

/// Higher sorts first: path kind (exact, prefix, regex), prefix length,
/// method, header count, query count.
fn precedence(m: &HttpRouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(p) if p.kind == "Exact" => (2, p.value.len()),
        Some(p) if p.kind == "RegularExpression" => (0, 0),
        Some(p) => (1, p.value.len()),
        None => (1, 1),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_ports_resolve_as_the_spec_says() {
        let port = |scheme: Option<&str>, port: Option<u16>| {
            let filter = HttpRequestRedirect {
                scheme: scheme.map(str::to_string),
                port,
                ..HttpRequestRedirect::default()
            };
            let compiled = redirect(&filter, 8080);
            (compiled.port, compiled.status)
        };
        assert_eq!(port(None, None), (8080, 302), "the parent Service's port");
        assert_eq!(port(Some("https"), None), (443, 302));
        assert_eq!(port(Some("http"), None), (80, 302));
        assert_eq!(port(Some("https"), Some(8443)), (8443, 302));
        assert_eq!(port(None, Some(8083)), (8083, 302));
    }

    #[test]
    fn gateway_durations() {
        assert_eq!(parse_gateway_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_gateway_duration("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_gateway_duration("1m30s"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_gateway_duration("1h"),
            Some(Duration::from_secs(3600))
        );
        for bad in ["", "s", "2", "2d", "-1s", "1.5s"] {
            assert_eq!(parse_gateway_duration(bad), None, "{bad}");
        }
    }
}
