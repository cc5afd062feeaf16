//! The routing decision as pure functions: which rule a request matches,
//! and which backend a rule's weights pick. No sockets, so it is tested
//! directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use http::request::Parts;
use regex::Regex;
use trellis_proto::discovery::route_match::PathKind;
use trellis_proto::discovery::{Backend, RouteMatch, Routes, Rule, ValueMatch};

/// Routes with their regular expressions compiled once, and each rule's
/// requests in flight (for rules with a circuit breaker).
#[derive(Debug, Default)]
pub struct CompiledRoutes {
    pub rules: Vec<Rule>,
    regexes: HashMap<String, Regex>,
    in_flight: Vec<AtomicU32>,
}

impl CompiledRoutes {
    /// Compiles the routes from the controller, which validated them; a
    /// pattern that still fails to compile makes its match fail closed.
    pub fn new(routes: Routes) -> Self {
        let mut regexes = HashMap::new();
        for rule in &routes.rules {
            let Some(m) = &rule.r#match else { continue };
            let mut patterns: Vec<&str> = m
                .headers
                .iter()
                .chain(&m.query_params)
                .filter(|v| v.regex)
                .map(|v| v.value.as_str())
                .collect();
            if m.path_kind == PathKind::Regex as i32 {
                patterns.push(&m.path);
            }
            for pattern in patterns {
                // Anchored: Gateway API regexes match the whole value.
                if let Ok(regex) = Regex::new(&format!("^(?:{pattern})$")) {
                    regexes.insert(pattern.to_string(), regex);
                }
            }
        }
        Self {
            in_flight: routes.rules.iter().map(|_| AtomicU32::new(0)).collect(),
            rules: routes.rules,
            regexes,
        }
    }

    /// Admits a request to `rule` under its circuit breaker: `Err` with the
    /// cap when the rule already has that many requests in flight. The
    /// guard counts the request until it is dropped.
    pub fn admit(&self, rule: &Rule) -> Result<Option<Admitted<'_>>, u32> {
        let Some(max) = rule
            .resilience
            .as_ref()
            .and_then(|r| r.circuit_breaker.as_ref())
            .and_then(|c| c.max_requests)
        else {
            return Ok(None);
        };
        let index = self.rules.iter().position(|r| std::ptr::eq(r, rule));
        let Some(in_flight) = index.and_then(|i| self.in_flight.get(i)) else {
            return Ok(None);
        };
        in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Some(Admitted(in_flight)))
            .map_err(|_| max)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule (rules arrive in precedence order) whose match matches.
    pub fn select(&self, request: &Parts) -> Option<&Rule> {
        self.rules.iter().find(|rule| {
            rule.r#match
                .as_ref()
                .is_none_or(|m| self.matches(m, request))
        })
    }

    fn matches(&self, m: &RouteMatch, request: &Parts) -> bool {
        let path = request.uri.path();
        let path_ok = match PathKind::try_from(m.path_kind).unwrap_or(PathKind::Prefix) {
            PathKind::Exact => path == m.path,
            PathKind::Prefix => prefix_matches(&m.path, path),
            PathKind::Regex => self.regex_matches(&m.path, path),
        };
        if !path_ok || (!m.method.is_empty() && request.method.as_str() != m.method) {
            return false;
        }
        let headers_ok = m.headers.iter().all(|h| {
            request
                .headers
                .get_all(h.name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| self.value_matches(h, v))
        });
        let query = request.uri.query().unwrap_or("");
        headers_ok
            && m.query_params.iter().all(|q| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(name, _)| *name == q.name)
                    .is_some_and(|(_, value)| self.value_matches(q, value))
            })
    }

    fn value_matches(&self, m: &ValueMatch, value: &str) -> bool {
        if m.regex {
            self.regex_matches(&m.value, value)
        } else {
            m.value == value
        }
    }

    fn regex_matches(&self, pattern: &str, value: &str) -> bool {
        self.regexes.get(pattern).is_some_and(|r| r.is_match(value))
    }
}

/// A request counted against its rule's circuit breaker.
pub struct Admitted<'a>(&'a AtomicU32);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gateway API prefixes match whole path segments: `/foo` matches `/foo`
/// and `/foo/bar`, not `/foobar`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// Picks a backend at random in proportion to the weights; `None` when every
/// weight is 0.
pub fn pick_backend(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(0..total);
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if point < w {
            return true;
        }
        point -= w;
        false
    })
}

/// Whether an injected fault fires for this request (`percent` of 100).
pub fn fires(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_rule_circuit_breaker_caps_requests_in_flight() {
        use trellis_proto::discovery::{CircuitBreaker, Resilience};
        let capped = Rule {
            resilience: Some(Resilience {
                circuit_breaker: Some(CircuitBreaker {
                    max_requests: Some(2),
                }),
                ..Resilience::default()
            }),
            ..rule("capped", prefix("/"))
        };
        let routes = CompiledRoutes::new(Routes {
            rules: vec![capped],
            ..Routes::default()
        });
        let capped = &routes.rules[0];
        let first = routes.admit(capped).unwrap();
        let second = routes.admit(capped).unwrap();
        assert!(first.is_some() && second.is_some());
        assert_eq!(routes.admit(capped).err(), Some(2), "the third is shed");
        drop(first);
        assert!(
            routes.admit(capped).unwrap().is_some(),
            "a finished request frees its slot"
        );
        drop(second);
        let free = CompiledRoutes::new(Routes {
            rules: vec![rule("free", prefix("/"))],
            ..Routes::default()
        });
        assert!(
            free.admit(&free.rules[0]).unwrap().is_none(),
            "no breaker, no count"
        );
    }

    fn rule(name: &str, m: RouteMatch) -> Rule {
        Rule {
            r#match: Some(m),
            route: name.into(),
            ..Rule::default()
        }
    }

    fn prefix(path: &str) -> RouteMatch {
        RouteMatch {
            path_kind: PathKind::Prefix as i32,
            path: path.into(),
            ..RouteMatch::default()
        }
    }

    fn value(name: &str, value: &str, regex: bool) -> ValueMatch {
        ValueMatch {
            name: name.into(),
            value: value.into(),
            regex,
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let routes = CompiledRoutes::new(Routes {
            rules: vec![
                rule(
                    "canary",
                    RouteMatch {
                        headers: vec![value("x-canary", "true", false)],
                        ..prefix("/")
                    },
                ),
                rule(
                    "api",
                    RouteMatch {
                        method: "POST".into(),
                        ..prefix("/api")
                    },
                ),
                rule(
                    "regex",
                    RouteMatch {
                        path_kind: PathKind::Regex as i32,
                        path: "/v[0-9]+/.*".into(),
                        ..RouteMatch::default()
                    },
                ),
                rule(
                    "query",
                    RouteMatch {
                        query_params: vec![value("beta", "y.*", true)],
                        ..prefix("/")
                    },
                ),
                rule("default", prefix("/")),
            ],
            sources: vec![],
        });
        let pick = |method, uri, headers: &[(&str, &str)]| {
            routes
                .select(&parts(method, uri, headers))
                .unwrap()
                .route
                .clone()
        };
        assert_eq!(pick("GET", "/", &[("x-canary", "true")]), "canary");
        assert_eq!(pick("GET", "/", &[("x-canary", "false")]), "default");
        assert_eq!(pick("POST", "/api/x", &[]), "api");
        assert_eq!(pick("GET", "/api/x", &[]), "default", "method must match");
        assert_eq!(
            pick("POST", "/apix", &[]),
            "default",
            "prefixes match whole segments"
        );
        assert_eq!(pick("GET", "/v2/users", &[]), "regex");
        assert_eq!(pick("GET", "/x?beta=yes", &[]), "query");
        assert_eq!(pick("GET", "/x?beta=no", &[]), "default");
    }

    #[test]
    fn no_rule_matches_when_none_applies() {
        let routes = CompiledRoutes::new(Routes {
            rules: vec![rule("only", prefix("/only"))],
            sources: vec![],
        });
        assert!(routes.select(&parts("GET", "/other", &[])).is_none());
    }

    #[test]
    fn weights_split_traffic_in_proportion() {
        let backends = [
            Backend {
                authority: "a".into(),
                weight: 90,
                name: "a".into(),
                ..Backend::default()
            },
            Backend {
                authority: "b".into(),
                weight: 10,
                name: "b".into(),
                ..Backend::default()
            },
            Backend {
                authority: "c".into(),
                weight: 0,
                name: "c".into(),
                ..Backend::default()
            },
        ];
        let mut counts = HashMap::new();
        for _ in 0..10_000 {
            *counts
                .entry(pick_backend(&backends).unwrap().name.clone())
                .or_insert(0) += 1;
        }
        let a = counts["a"] as f64 / 100.0;
        assert!((88.0..=92.0).contains(&a), "a got {a}%");
        assert!(!counts.contains_key("c"), "weight 0 gets nothing");
        assert!(pick_backend(&backends[2..]).is_none());
    }
}
