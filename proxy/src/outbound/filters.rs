//! The HTTPRoute filters that change a request or its response on its way
//! through the client's sidecar: header modifiers, URL rewrites, and
//! redirects answered without a backend. Pure functions over heads, so they
//! are tested directly.

use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Response, StatusCode, Uri};
use trellis_proto::discovery::route_match::PathKind;
use trellis_proto::discovery::{
    path_modifier, HeaderModifier, PathModifier, Redirect, Rewrite, Rule,
};

use crate::errors::ProxyError;
use crate::http::{full, Body};

/// Applies a header modifier filter (set, then add, then remove). Names
/// and values were validated by the controller; one that still does not
/// parse is skipped.
pub(super) fn modify_headers(headers: &mut http::HeaderMap, modifier: &HeaderModifier) {
    let pair = |h: &trellis_proto::discovery::Header| {
        Some((
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_str(&h.value).ok()?,
        ))
    };
    for (name, value) in modifier.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in modifier.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

/// The path prefix the rule matched, which a `ReplacePrefixMatch` replaces
/// (the controller allows that modifier only on a PathPrefix rule).
fn matched_prefix(rule: &Rule) -> &str {
    match &rule.r#match {
        Some(m) if m.path_kind == PathKind::Prefix as i32 => &m.path,
        _ => "/",
    }
}

/// The rule's request filters, in the order Gateway API implementations
/// apply them: the rewrite, then the header modifier.
pub(super) fn apply_to_request(parts: &mut Parts, rule: &Rule) {
    if let Some(rewrite) = &rule.rewrite {
        apply_rewrite(parts, rewrite, matched_prefix(rule));
    }
    if let Some(modifier) = &rule.request_headers {
        modify_headers(&mut parts.headers, modifier);
    }
}

fn apply_rewrite(parts: &mut Parts, rewrite: &Rewrite, prefix: &str) {
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    if let Some(modifier) = &rewrite.path {
        let path = uri.path_and_query.as_ref().map_or("/", |p| p.path());
        let mut new = modified_path(path, modifier, prefix);
        if let Some(query) = uri.path_and_query.as_ref().and_then(|p| p.query()) {
            new = format!("{new}?{query}");
        }
        // Validated by the controller; an unparsable one keeps the path.
        match PathAndQuery::try_from(new) {
            Ok(path) => uri.path_and_query = Some(path),
            Err(e) => tracing::warn!(error = %e, "rewritten path is not valid; path unchanged"),
        }
    }
    if !rewrite.hostname.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&rewrite.hostname) {
            parts.headers.insert(http::header::HOST, value);
        }
        if uri.authority.is_some() {
            uri.authority = Authority::try_from(rewrite.hostname.as_str()).ok();
        }
    }
    parts.uri = Uri::from_parts(uri).unwrap_or_default();
}

fn modified_path(path: &str, modifier: &PathModifier, prefix: &str) -> String {
    match path_modifier::Kind::try_from(modifier.kind) {
        Ok(path_modifier::Kind::Prefix) => replace_prefix(path, prefix, &modifier.value),
        _ => modifier.value.clone(),
    }
}

/// Replaces the matched `prefix` of `path` (whole segments, a trailing `/`
/// of either ignored), as the table in the HTTPPathModifier reference.
pub(super) fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

/// The answer to a request whose rule redirects: the status and a
/// `Location` built from the request, with the filter's parts replaced.
/// The scheme's default port is left out, as the HTTPRoute spec asks.
pub(super) fn redirect(
    parts: &Parts,
    redirect: &Redirect,
    rule: &Rule,
) -> Result<Response<Body>, ProxyError> {
    let scheme = match redirect.scheme.as_str() {
        "" => parts.uri.scheme_str().unwrap_or("http"),
        scheme => scheme,
    };
    let requested = request_authority(parts).ok_or(ProxyError::NoAuthority)?;
    let host = match redirect.hostname.as_str() {
        "" => requested.host(),
        host => host,
    };
    let port = match redirect.port {
        0 => requested
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 }),
        port => port as u16,
    };
    let path = match &redirect.path {
        Some(modifier) => modified_path(parts.uri.path(), modifier, matched_prefix(rule)),
        None => parts.uri.path().to_string(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
    let location = if default_port {
        format!("{scheme}://{host}{path}{query}")
    } else {
        format!("{scheme}://{host}:{port}{path}{query}")
    };
    let status = u16::try_from(redirect.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(StatusCode::is_redirection)
        .unwrap_or(StatusCode::FOUND);
    let location = HeaderValue::from_str(&location).map_err(|_| ProxyError::NoAuthority)?;
    let mut response = Response::new(full(bytes::Bytes::new()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::LOCATION, location);
    Ok(response)
}

/// The authority as the client wrote it (absolute URI or Host header).
fn request_authority(parts: &Parts) -> Option<Authority> {
    if let Some(authority) = parts.uri.authority() {
        return Some(authority.clone());
    }
    let host = parts.headers.get(http::header::HOST)?.to_str().ok()?;
    Authority::try_from(host).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::discovery::{Header, RouteMatch};

    fn parts(uri: &str, host: &str) -> Parts {
        http::Request::get(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn prefix_rule(prefix: &str) -> Rule {
        Rule {
            r#match: Some(RouteMatch {
                path_kind: PathKind::Prefix as i32,
                path: prefix.into(),
                ..RouteMatch::default()
            }),
            ..Rule::default()
        }
    }

    fn modifier(kind: path_modifier::Kind, value: &str) -> Option<PathModifier> {
        Some(PathModifier {
            kind: kind as i32,
            value: value.into(),
        })
    }

    #[test]
    fn prefix_replacement_follows_the_spec_table() {
        // Request path, prefix match, replacement, modified path.
        let table = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/a/b", "/", "/xyz", "/xyz/a/b"),
        ];
        for (path, prefix, replacement, want) in table {
            assert_eq!(
                replace_prefix(path, prefix, replacement),
                want,
                "{path} {prefix} {replacement}"
            );
        }
    }

    #[test]
    fn redirect_locations_elide_the_default_port_only() {
        let rule = prefix_rule("/old");
        let location = |redirect: Redirect, uri: &str, host: &str| {
            let response = super::redirect(&parts(uri, host), &redirect, &rule).unwrap();
            (
                response.status().as_u16(),
                response.headers()["location"].to_str().unwrap().to_string(),
            )
        };
        let port = |port| Redirect {
            port,
            status: 302,
            ..Redirect::default()
        };
        assert_eq!(
            location(port(80), "/old/x?q=1", "echo"),
            (302, "http://echo/old/x?q=1".into())
        );
        assert_eq!(
            location(port(8083), "/old", "echo:80"),
            (302, "http://echo:8083/old".into())
        );
        let https = Redirect {
            scheme: "https".into(),
            hostname: "example.org".into(),
            port: 443,
            status: 301,
            path: modifier(path_modifier::Kind::Prefix, "/new"),
        };
        assert_eq!(
            location(https, "/old/lemon", "echo"),
            (301, "https://example.org/new/lemon".into())
        );
        let full = Redirect {
            port: 80,
            status: 308,
            path: modifier(path_modifier::Kind::Full, "/elsewhere"),
            ..Redirect::default()
        };
        assert_eq!(
            location(full, "/old/a/b", "echo"),
            (308, "http://echo/elsewhere".into())
        );
        // Without a port from the controller, the request's own.
        assert_eq!(
            location(port(0), "/old", "echo:8080"),
            (302, "http://echo:8080/old".into())
        );
    }

    #[test]
    fn rewrite_changes_host_and_path_keeps_the_query() {
        let rule = Rule {
            rewrite: Some(Rewrite {
                hostname: "elsewhere.example".into(),
                path: modifier(path_modifier::Kind::Prefix, "/one"),
            }),
            request_headers: Some(HeaderModifier {
                set: vec![Header {
                    name: "x-set".into(),
                    value: "yes".into(),
                }],
                ..HeaderModifier::default()
            }),
            ..prefix_rule("/prefix/one")
        };
        let mut request = parts("/prefix/one/two?x=1", "echo");
        apply_to_request(&mut request, &rule);
        assert_eq!(request.uri.to_string(), "/one/two?x=1");
        assert_eq!(request.headers["host"], "elsewhere.example");
        assert_eq!(request.headers["x-set"], "yes");
        let mut absolute = http::Request::get("http://echo:80/prefix/one")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        apply_to_request(&mut absolute, &rule);
        assert_eq!(absolute.uri.to_string(), "http://elsewhere.example/one");
    }

    #[test]
    fn header_modifier_sets_adds_then_removes() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-env", "prod".parse().unwrap());
        headers.insert("x-debug", "1".parse().unwrap());
        let header = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        modify_headers(
            &mut headers,
            &HeaderModifier {
                set: vec![header("x-env", "canary")],
                add: vec![header("x-tag", "a"), header("x-tag", "b")],
                remove: vec!["x-debug".into()],
            },
        );
        assert_eq!(headers["x-env"], "canary");
        assert_eq!(headers.get_all("x-tag").iter().count(), 2);
        assert!(!headers.contains_key("x-debug"));
    }
}
