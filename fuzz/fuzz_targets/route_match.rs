//! Route matching: rules as the controller sends them (any paths, headers,
//! query parameters and regular expressions) against any request.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use trellis_proto::discovery::route_match::PathKind;
use trellis_proto::discovery::{Backend, RouteMatch, Routes, Rule, ValueMatch};
use trellis_proxy::route::{pick_backend, CompiledRoutes};

#[derive(Arbitrary, Debug)]
struct Input {
    rules: Vec<RuleInput>,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

#[derive(Arbitrary, Debug)]
struct RuleInput {
    path_kind: u8,
    path: String,
    method: String,
    headers: Vec<(String, String, bool)>,
    query_params: Vec<(String, String, bool)>,
    weights: Vec<u32>,
    has_match: bool,
}

fn values(values: Vec<(String, String, bool)>) -> Vec<ValueMatch> {
    values
        .into_iter()
        .map(|(name, value, regex)| ValueMatch { name, value, regex })
        .collect()
}

fn rule(input: RuleInput) -> Rule {
    let path_kind = match input.path_kind % 3 {
        0 => PathKind::Prefix,
        1 => PathKind::Exact,
        _ => PathKind::Regex,
    };
    Rule {
        r#match: input.has_match.then(|| RouteMatch {
            path_kind: path_kind as i32,
            path: input.path,
            headers: values(input.headers),
            query_params: values(input.query_params),
            method: input.method,
        }),
        backends: input
            .weights
            .into_iter()
            .enumerate()
            .map(|(i, weight)| Backend {
                authority: format!("b{i}.default.svc.cluster.local:80"),
                weight,
                name: format!("b{i}"),
                ..Backend::default()
            })
            .collect(),
        ..Rule::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let routes = CompiledRoutes::new(Routes {
        rules: input.rules.into_iter().map(rule).collect(),
        sources: Vec::new(),
    });
    let mut request = http::Request::builder()
        .method(input.method.as_str())
        .uri(input.uri.as_str());
    for (name, value) in &input.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let Some(chosen) = routes.select(&parts) else {
        return;
    };
    if let Some(m) = &chosen.r#match {
        if m.path_kind == PathKind::Exact as i32 {
            assert_eq!(parts.uri.path(), m.path);
        }
        if !m.method.is_empty() {
            assert_eq!(parts.method.as_str(), m.method);
        }
    }
    if let Some(backend) = pick_backend(&chosen.backends) {
        assert!(backend.weight > 0, "a backend of weight 0 was picked");
    }
    let _ = routes.admit(chosen);
});
