//! Gateway API's MESH conformance tests (kubernetes-sigs/gateway-api,
//! `conformance/tests/mesh/`), each written from its upstream table of
//! requests and expected answers and run against real sidecars and echo
//! pods (`trellis_tests::conformance`). Each test names its upstream file;
//! the README lists which pass and which are not implemented, with why.

use trellis_tests::conformance::*;

/// `backend`'s answer to a GET of `path` on the Service `echo`.
fn to(backend: &'static str, path: &'static str) -> Case {
    Case {
        backend,
        ..Case::get(path, svc("echo"), path)
    }
}

/// A route attached to `parent` (with its port, if any) with `rules`.
fn route(name: &str, parent: &str, port: Option<u16>, rules: &str) -> String {
    let port = port.map_or(String::new(), |p| format!(", port: {p}"));
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {MESH_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {parent}{port}}}]
  rules:
{rules}"
    )
}

/// mesh-basic.go: with no route, a request to a Service is served.
#[tokio::test]
async fn mesh_basic() {
    let mesh = ConformanceMesh::start().await;
    expect(&mesh.client(), &Case::get("basic", svc("echo"), "/")).await;
}

/// httproute-simple-same-namespace.go
#[tokio::test]
async fn httproute_simple_same_namespace() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "gateway-conformance-mesh-test",
            "echo",
            Some(80),
            "  - backendRefs: [{name: echo-v1, port: 8080}]\n",
        ),
    );
    expect(&mesh.client(), &to("echo-v1", "/")).await;
}

/// httproute-matching.go: path prefixes match whole segments; a header
/// match ORed with a path.
#[tokio::test]
async fn httproute_matching() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-matching",
            "echo",
            Some(80),
            "  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        ),
    );
    let with = |case: Case, header: &'static str| Case {
        headers: vec![("Version", header)],
        ..case
    };
    expect_all(
        &mesh.client(),
        &[
            to("echo-v1", "/"),
            to("echo-v1", "/example"),
            with(to("echo-v1", "/"), "one"),
            to("echo-v2", "/v2"),
            to("echo-v2", "/v2/example"),
            with(to("echo-v2", "/"), "two"),
            to("echo-v2", "/v2/"),
            to("echo-v1", "/v2example"),
            to("echo-v1", "/foo/v2/example"),
        ],
    )
    .await;
}

/// httproute-query-param-matching.go
#[tokio::test]
async fn httproute_query_param_matching() {
    let mesh = ConformanceMesh::start().await;
    let backend = |b: &str| format!("    backendRefs: [{{name: {b}, port: 8080}}]\n");
    let rules = [
        "  - matches: [{queryParams: [{name: animal, value: whale}]}]\n".to_string()
            + &backend("echo-v1"),
        "  - matches: [{queryParams: [{name: animal, value: dolphin}]}]\n".to_string()
            + &backend("echo-v2"),
        "  - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]\n".to_string()
            + &backend("echo-v1"),
        "  - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]\n".to_string()
            + &backend("echo-v2"),
        "  - matches:
    - {path: {type: PathPrefix, value: /path3}, queryParams: [{name: animal, value: shark}]}
    - path: {type: PathPrefix, value: /path4}
      headers: [{name: version, value: three}]
      queryParams: [{name: animal, value: kraken}]\n".to_string()
            + &backend("echo-v1"),
        "  - matches: [{path: {type: PathPrefix, value: /path5}}]\n".to_string()
            + &backend("echo-v1"),
        "  - matches: [{queryParams: [{name: animal, value: hydra}]}]\n".to_string()
            + &backend("echo-v2"),
    ];
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-query-param-matching",
            "echo",
            Some(80),
            &rules.concat(),
        ),
    );
    let not_found = |path: &'static str| Case {
        status: 404,
        ..Case::get(path, svc("echo"), path)
    };
    let with = |case: Case, header: &'static str| Case {
        headers: vec![("version", header)],
        ..case
    };
    expect_all(
        &mesh.client(),
        &[
            to("echo-v1", "/?animal=whale"),
            to("echo-v2", "/?animal=dolphin"),
            to("echo-v1", "/?animal=whale&otherparam=irrelevant"),
            to("echo-v2", "/?animal=dolphin&color=yellow"),
            not_found("/?color=blue"),
            not_found("/?animal=dog"),
            not_found("/?animal=whaledolphin"),
            not_found("/"),
            to("echo-v1", "/path1?animal=whale"),
            with(to("echo-v2", "/?animal=whale"), "one"),
            to("echo-v1", "/path3?animal=shark"),
            with(to("echo-v1", "/path4?animal=kraken"), "three"),
            not_found("/?animal=shark"),
            not_found("/path4?animal=kraken"),
            to("echo-v1", "/path5?animal=hydra"),
        ],
    )
    .await;
}

/// httproute-named-rule.go: a rule's `name` changes nothing about routing.
#[tokio::test]
async fn httproute_named_rule() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-http-named-rules",
            "echo",
            Some(80),
            "  - name: named-rule
    matches: [{path: {type: PathPrefix, value: /named}}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /unnamed}}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        ),
    );
    expect_all(
        &mesh.client(),
        &[
            Case {
                seen_path: Some("/named"),
                ..to("echo-v1", "/named")
            },
            Case {
                seen_path: Some("/unnamed"),
                ..to("echo-v2", "/unnamed")
            },
        ],
    )
    .await;
}

/// httproute-request-header-modifier.go (the table is shared with the
/// `-backend` variant, in tests/tests/filters.rs)
#[tokio::test]
async fn httproute_request_header_modifier() {
    let mesh = ConformanceMesh::start().await;
    let rules: String = HEADER_MODIFIER_RULES
        .iter()
        .map(|(path, modifier)| {
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {modifier}}}]
    backendRefs: [{{name: echo-v1, port: 8080}}]
"
            )
        })
        .collect();
    mesh.apply(
        "route.yaml",
        &route("mesh-request-header-modifier", "echo", Some(80), &rules),
    );
    expect_all(
        &mesh.client(),
        &header_modifier_cases(&svc("echo"), "echo-v1"),
    )
    .await;
}

/// httproute-weight.go: 70/30 across echo-v1 and echo-v2.
#[tokio::test]
async fn httproute_weight() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-weighted-backends",
            "echo",
            Some(80),
            "  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 70}
    - {name: echo-v2, port: 8080, weight: 30}
",
        ),
    );
    let client = mesh.client();
    expect(&client, &Case::get("weighted", svc("echo"), "/")).await;
    // Upstream allows each backend's share to be off by 5 points.
    let shares = trellis_tests::eventually(
        std::time::Duration::from_secs(10),
        "a 70/30 split",
        || async {
            let shares = pod_shares(&client, &svc("echo"), 1000).await?;
            let v1 = shares.get("echo-v1").copied().unwrap_or(0.0);
            if (v1 - 70.0).abs() <= 5.0 {
                Ok(shares)
            } else {
                Err(format!("{shares:?}"))
            }
        },
    )
    .await;
    let v2 = shares.get("echo-v2").copied().unwrap_or(0.0);
    assert!((v2 - 30.0).abs() <= 5.0, "{shares:?}");
}

/// The percentage of `n` GETs each pod answered.
async fn pod_shares(
    client: &trellis_tests::AppClient,
    host: &str,
    n: usize,
) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let answer = client.get(host, "/").await?;
        let echoed: Echoed = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("{} {}: {e}", answer.status, answer.text()))?;
        *counts.entry(echoed.pod).or_insert(0.0) += 100.0 / n as f64;
    }
    Ok(counts)
}

/// mesh-split.go: exact paths split one Service across two.
#[tokio::test]
async fn mesh_split() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-split",
            "echo",
            None,
            "  - matches: [{path: {type: Exact, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
",
        ),
    );
    expect_all(
        &mesh.client(),
        &[to("echo-v1", "/v1"), to("echo-v2", "/v2")],
    )
    .await;
}

/// Producer and consumer routes side by side (GAMMA; upstream's
/// mesh-consumer-route.go checks the first half): a consumer route changes
/// only its namespace's traffic, and wins there over the producer's.
#[tokio::test]
async fn consumer_routes_change_only_their_namespaces_traffic() {
    let mesh = ConformanceMesh::start().await;
    let setting = |value: &str| {
        format!(
            "  - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: X-Header-Set, value: {value}}}]}}}}]
    backendRefs: [{{name: echo-v1, namespace: {MESH_NS}, port: 80}}]
"
        )
    };
    let consumer_route = route(
        "mesh-echo-add-header",
        "echo-v1",
        None,
        &setting("consumer"),
    )
    .replace(
        &format!("namespace: {MESH_NS}}}\nspec"),
        &format!("namespace: {CONSUMER_NS}}}\nspec"),
    )
    .replace(
        "name: echo-v1}]",
        &format!("name: echo-v1, namespace: {MESH_NS}}}]"),
    );
    mesh.apply("consumer.yaml", &consumer_route);
    let sees = |value: Option<&'static str>| Case {
        seen_headers: value.map(|v| vec![("X-Header-Set", v)]).unwrap_or_default(),
        absent_seen_headers: if value.is_none() {
            vec!["X-Header-Set"]
        } else {
            vec![]
        },
        backend: "echo-v1",
        ..Case::get("consumer route", svc("echo-v1"), "/")
    };
    expect(&mesh.consumer_client(), &sees(Some("consumer"))).await;
    expect(&mesh.client(), &sees(None)).await;

    mesh.apply(
        "producer.yaml",
        &route("producer", "echo-v1", None, &setting("producer")),
    );
    expect(&mesh.client(), &sees(Some("producer"))).await;
    expect(&mesh.consumer_client(), &sees(Some("consumer"))).await;
}

/// A rule that sets `X-Header-Set: value` on the response and sends to
/// `backend` port 80.
fn response_header_rule(value: &str, backend: &str) -> String {
    format!(
        "  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: {value}}}]}}}}]
    backendRefs: [{{name: {backend}, port: 80}}]
"
    )
}

/// `backend`'s answer to a GET of `/` on `host`, with `X-Header-Set` set
/// to `value` on the response, or absent.
fn answer(host: String, backend: &'static str, value: Option<&'static str>) -> Case {
    Case {
        backend,
        response_headers: value.map(|v| vec![("X-Header-Set", v)]).unwrap_or_default(),
        absent_response_headers: if value.is_none() {
            vec!["X-Header-Set"]
        } else {
            vec![]
        },
        ..Case::get("answer", host, "/")
    }
}

/// mesh-ports.go: a parentRef with a port applies to that port only.
#[tokio::test]
async fn mesh_ports() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &(route(
            "mesh-split-v1",
            "echo-v1",
            Some(80),
            &response_header_rule("v1", "echo-v1"),
        ) + "---\n"
            + &route(
                "mesh-split-v2",
                "echo-v2",
                None,
                &response_header_rule("v2", "echo-v2"),
            )),
    );
    expect_all(
        &mesh.client(),
        &[
            answer(svc("echo-v1"), "echo-v1", Some("v1")),
            answer(svc("echo-v1") + ":8080", "echo-v1", None),
            answer(svc("echo-v2"), "echo-v2", Some("v2")),
            answer(svc("echo-v2") + ":8080", "echo-v2", Some("v2")),
        ],
    )
    .await;
}

/// mesh-frontend.go: a route applies to traffic for its Service, not to
/// requests straight to one of its pods' IPs (upstream's pods listen on
/// 8080; ours on `app_port`).
#[tokio::test]
async fn mesh_frontend() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-split-v1",
            "echo-v2",
            None,
            &response_header_rule("set", "echo-v2"),
        ),
    );
    let pod_ip = format!("{}:{}", mesh.echo[1].ip, mesh.app_port);
    expect_all(
        &mesh.client(),
        &[
            answer(svc("echo-v2"), "echo-v2", Some("set")),
            answer(pod_ip, "echo-v2", None),
        ],
    )
    .await;
}

/// mesh-frontend-hostname.go: the Service a request is for decides, not
/// its Host header.
#[tokio::test]
async fn mesh_frontend_hostname() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-split-v1",
            "echo-v2",
            None,
            &response_header_rule("set", "echo-v2"),
        ),
    );
    expect_all(
        &mesh.client(),
        &[
            Case {
                headers: vec![("Host", "echo-v1")],
                ..answer(svc("echo-v2"), "echo-v2", Some("set"))
            },
            Case {
                headers: vec![("Host", "echo-v2")],
                ..answer(svc("echo-v1"), "echo-v1", None)
            },
        ],
    )
    .await;
}

/// mesh-consumer-route.go: a route in the consumer namespace changes the
/// consumer's requests only.
#[tokio::test]
async fn mesh_consumer_route() {
    let mesh = ConformanceMesh::start().await;
    let rule = format!(
        "  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set}}]}}}}]
    backendRefs: [{{name: echo-v1, namespace: {MESH_NS}, port: 80}}]
"
    );
    mesh.apply(
        "consumer.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-echo-add-header, namespace: {CONSUMER_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo-v1, namespace: {MESH_NS}}}]
  rules:
{rule}"
        ),
    );
    expect(
        &mesh.consumer_client(),
        &answer(svc("echo-v1"), "echo-v1", Some("set")),
    )
    .await;
    expect(&mesh.client(), &answer(svc("echo-v1"), "echo-v1", None)).await;
}
