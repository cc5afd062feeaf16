//! HTTPRoute filters end to end, through real sidecars and echo pods
//! (`trellis_tests::conformance`): redirects, URL rewrites, header
//! modifiers on a rule and on one backend, response header modifiers,
//! request mirroring and backendRequest timeouts. The redirect, rewrite and
//! header cases are written from the tables of Gateway API's mesh
//! conformance tests (`conformance/tests/mesh/`), each test naming its file.

use std::time::{Duration, Instant};

use bytes::Bytes;
use trellis_tests::conformance::*;
use trellis_tests::{eventually, metric, AppClient};

/// A route attached to port 80 of the Service `echo`, with `rules`.
fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {MESH_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]
  rules:
{rules}"
    )
}

/// A rule matching the path prefix `prefix` that redirects with
/// `redirect` (the fields of `requestRedirect`).
fn redirect_rule(prefix: &str, redirect: &str) -> String {
    format!(
        "  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters: [{{type: RequestRedirect, requestRedirect: {{{redirect}}}}}]
"
    )
}

/// A redirect the sidecar answers for `path` on `echo`: the status and the
/// whole Location.
fn redirected(path: &'static str, status: u16, location: &str) -> Case {
    Case {
        status,
        location: Some(location.to_string()),
        ..Case::get(path, svc("echo"), path)
    }
}

/// The Location of a redirect that keeps everything but what the
/// upstream case changes: `echo`'s host as the client wrote it, port 80.
fn location(scheme: &str, host: Option<&str>, port: Option<u16>, path: &str) -> String {
    let echo = svc("echo");
    let host = host.unwrap_or(&echo);
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// httproute-303-redirect.go, httproute-307-redirect.go and
/// httproute-308-redirect.go: the status code is the filter's, the
/// Location the request's own URL.
#[tokio::test]
async fn httproute_303_307_308_redirect() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-redirect-status",
            &[
                redirect_rule("/redirect", "statusCode: 303"),
                redirect_rule("/temporary", "statusCode: 307"),
                redirect_rule("/permanent", "statusCode: 308"),
            ]
            .concat(),
        ),
    );
    let http = |path| location("http", None, None, path);
    expect_all(
        &mesh.client(),
        &[
            redirected("/redirect", 303, &http("/redirect")),
            redirected("/temporary", 307, &http("/temporary")),
            redirected("/permanent", 308, &http("/permanent")),
        ],
    )
    .await;
    // A redirect is still a request in the client's metrics.
    let admin = mesh.echo[0].proxy.admin_addr;
    let filter = [("direction", "outbound"), ("status_code", "308")];
    assert!(metric(admin, "trellis_requests_total", &filter).await >= 3.0);
}

/// httproute-redirect-host-and-status.go
#[tokio::test]
async fn httproute_redirect_host_and_status() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-redirect-host-and-status",
            &[
                redirect_rule("/hostname-redirect", "hostname: example.org"),
                redirect_rule("/host-and-status", "statusCode: 301, hostname: example.org"),
            ]
            .concat(),
        ),
    );
    let org = |path| location("http", Some("example.org"), None, path);
    expect_all(
        &mesh.client(),
        &[
            redirected("/hostname-redirect", 302, &org("/hostname-redirect")),
            redirected("/host-and-status", 301, &org("/host-and-status")),
        ],
    )
    .await;
}

/// httproute-redirect-path.go
#[tokio::test]
async fn httproute_redirect_path() {
    let mesh = ConformanceMesh::start().await;
    let prefix = "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}";
    let full = |to: &str| format!("path: {{type: ReplaceFullPath, replaceFullPath: {to}}}");
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-redirect-path",
            &[
                redirect_rule("/original-prefix", prefix),
                redirect_rule("/full", &full("/full-path-replacement")),
                redirect_rule(
                    "/path-and-host",
                    &format!("hostname: example.org, {prefix}"),
                ),
                redirect_rule("/path-and-status", &format!("{prefix}, statusCode: 301")),
                redirect_rule(
                    "/full-path-and-host",
                    &format!("hostname: example.org, {}", full("/replacement-full")),
                ),
                redirect_rule(
                    "/full-path-and-status",
                    &format!("{}, statusCode: 301", full("/replacement-full")),
                ),
            ]
            .concat(),
        ),
    );
    let echo = |path| location("http", None, None, path);
    let org = |path| location("http", Some("example.org"), None, path);
    expect_all(
        &mesh.client(),
        &[
            redirected(
                "/original-prefix/lemon",
                302,
                &echo("/replacement-prefix/lemon"),
            ),
            redirected("/full/path/original", 302, &echo("/full-path-replacement")),
            redirected("/path-and-host", 302, &org("/replacement-prefix")),
            redirected("/path-and-status", 301, &echo("/replacement-prefix")),
            redirected("/full-path-and-host", 302, &org("/replacement-full")),
            redirected("/full-path-and-status", 301, &echo("/replacement-full")),
        ],
    )
    .await;
}

/// httproute-redirect-port.go
#[tokio::test]
async fn httproute_redirect_port() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-redirect-port",
            &[
                redirect_rule("/port", "port: 8083"),
                redirect_rule("/port-and-host", "hostname: example.org, port: 8083"),
                redirect_rule("/port-and-status", "port: 8083, statusCode: 301"),
                redirect_rule(
                    "/port-and-host-and-status",
                    "port: 8083, hostname: example.org, statusCode: 302",
                ),
            ]
            .concat(),
        ),
    );
    let echo = |path| location("http", None, Some(8083), path);
    let org = |path| location("http", Some("example.org"), Some(8083), path);
    expect_all(
        &mesh.client(),
        &[
            redirected("/port", 302, &echo("/port")),
            redirected("/port-and-host", 302, &org("/port-and-host")),
            redirected("/port-and-status", 301, &echo("/port-and-status")),
            redirected(
                "/port-and-host-and-status",
                302,
                &org("/port-and-host-and-status"),
            ),
        ],
    )
    .await;
}

/// httproute-redirect-scheme.go: https without a port goes to 443, which
/// the Location leaves out.
#[tokio::test]
async fn httproute_redirect_scheme() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-redirect-scheme",
            &[
                redirect_rule("/scheme", "scheme: https"),
                redirect_rule("/scheme-and-host", "hostname: example.org, scheme: https"),
                redirect_rule("/scheme-and-status", "scheme: https, statusCode: 301"),
                redirect_rule(
                    "/scheme-and-host-and-status",
                    "scheme: https, statusCode: 302, hostname: example.org",
                ),
            ]
            .concat(),
        ),
    );
    let echo = |path| location("https", None, None, path);
    let org = |path| location("https", Some("example.org"), None, path);
    expect_all(
        &mesh.client(),
        &[
            redirected("/scheme", 302, &echo("/scheme")),
            redirected("/scheme-and-host", 302, &org("/scheme-and-host")),
            redirected("/scheme-and-status", 301, &echo("/scheme-and-status")),
            redirected(
                "/scheme-and-host-and-status",
                302,
                &org("/scheme-and-host-and-status"),
            ),
        ],
    )
    .await;
}

/// The header modifier both rewrite-path cases carry.
const MODIFY_HEADERS: &str = "{type: RequestHeaderModifier, requestHeaderModifier: {
        set: [{name: X-Header-Set, value: set-overwrites-values}],
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}],
        remove: [X-Header-Remove]}}";

/// httproute-rewrite-path.go, plus a hostname rewrite.
#[tokio::test]
async fn httproute_rewrite_path() {
    let mesh = ConformanceMesh::start().await;
    let rule = |prefix: &str, filters: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters: [{filters}]
    backendRefs: [{{name: echo-v1, port: 80}}]
"
        )
    };
    let prefix = |to: &str| {
        format!(
            "{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: {to}}}}}}}"
        )
    };
    let full = |to: &str| {
        format!(
            "{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: {to}}}}}}}"
        )
    };
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-rewrite-path",
            &[
                rule("/prefix/one", &prefix("/one")),
                rule("/strip-prefix", &prefix("/")),
                rule("/full/one", &full("/one")),
                rule(
                    "/full/rewrite-path-and-modify-headers",
                    &format!("{}, {MODIFY_HEADERS}", full("/test")),
                ),
                rule(
                    "/prefix/rewrite-path-and-modify-headers",
                    &format!("{}, {MODIFY_HEADERS}", prefix("/prefix")),
                ),
                rule(
                    "/host",
                    "{type: URLRewrite, urlRewrite: {hostname: rewritten.example}}",
                ),
            ]
            .concat(),
        ),
    );
    let seen = |path: &'static str, seen: &'static str| Case {
        backend: "echo-v1",
        seen_path: Some(seen),
        ..Case::get(path, svc("echo"), path)
    };
    let modified = |path: &'static str, to: &'static str| Case {
        headers: vec![
            ("X-Header-Remove", "remove-val"),
            ("X-Header-Add-Append", "append-val-1"),
            ("X-Header-Set", "set-val"),
        ],
        seen_headers: vec![
            ("X-Header-Add", "header-val-1"),
            ("X-Header-Add-Append", "append-val-1,header-val-2"),
            ("X-Header-Set", "set-overwrites-values"),
        ],
        absent_seen_headers: vec!["X-Header-Remove"],
        ..seen(path, to)
    };
    expect_all(
        &mesh.client(),
        &[
            seen("/prefix/one/two", "/one/two"),
            seen("/strip-prefix/three", "/three"),
            seen("/strip-prefix", "/"),
            seen("/full/one/two", "/one"),
            modified("/full/rewrite-path-and-modify-headers/test", "/test"),
            modified("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
            Case {
                seen_host: Some("rewritten.example".into()),
                ..seen("/host/x?q=1", "/host/x?q=1")
            },
        ],
    )
    .await;
}

/// httproute-request-header-modifier-backend.yaml: the header modifiers of
/// httproute-request-header-modifier on one backendRef each, checked with
/// that test's table.
#[tokio::test]
async fn httproute_request_header_modifier_backend() {
    let mesh = ConformanceMesh::start().await;
    let rules: String = HEADER_MODIFIER_RULES
        .iter()
        .map(|(prefix, modifier)| {
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    backendRefs:
      - name: echo-v1
        port: 8080
        filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {modifier}}}]
"
            )
        })
        .collect();
    mesh.apply("route.yaml", &route("mesh-request-header-modifier", &rules));
    expect_all(
        &mesh.client(),
        &header_modifier_cases(&svc("echo"), "echo-v1"),
    )
    .await;
}

/// mesh-consumer-route.go's consumer side: a route in the consumer
/// namespace sets a response header on what its clients get from echo-v1.
/// And response header modifiers on the rule and on one backend: the
/// rule's apply first, so the backend's `set` wins.
#[tokio::test]
async fn response_header_modifiers_on_rule_and_backend() {
    let mesh = ConformanceMesh::start().await;
    mesh.apply(
        "consumer-route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-echo-add-header, namespace: {CONSUMER_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo-v1, namespace: {MESH_NS}}}]
  rules:
    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set}}]}}
      backendRefs: [{{name: echo-v1, namespace: {MESH_NS}, port: 80}}]
"
        ),
    );
    expect(
        &mesh.consumer_client(),
        &Case {
            backend: "echo-v1",
            response_headers: vec![("x-header-set", "set")],
            ..Case::get("consumer route", svc("echo-v1"), "/")
        },
    )
    .await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-response-headers",
            "  - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: X-Rule, value: rule}, {name: X-Both, value: rule}]
            add: [{name: Content-Type, value: also-added}]
    backendRefs:
      - name: echo-v2
        port: 80
        filters:
          - type: ResponseHeaderModifier
            responseHeaderModifier: {set: [{name: X-Both, value: backend}]}
",
        ),
    );
    let case = Case {
        backend: "echo-v2",
        response_headers: vec![("x-rule", "rule"), ("x-both", "backend")],
        ..Case::get("rule and backend", svc("echo"), "/")
    };
    expect(&mesh.client(), &case).await;
    let answer = mesh.client().get(&svc("echo"), "/").await.unwrap();
    let types: Vec<_> = answer.headers.get_all("content-type").iter().collect();
    assert_eq!(types, ["application/json", "also-added"], "add appends");
}

/// A route on `echo` whose one rule sends to echo-v1 and mirrors to the
/// Service `mirror` (`share` is the extra `requestMirror` fields).
fn mirror_route(share: &str) -> String {
    route(
        "mesh-mirror",
        &format!(
            "  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: mirror, port: 80}}{share}}}}}]
    backendRefs: [{{name: echo-v1, port: 80}}]
"
        ),
    )
}

/// The mirror gets a copy of every request, body included, while the
/// client gets echo-v1's answers; each copy is counted.
#[tokio::test]
async fn a_mirror_receives_a_copy_of_each_request_with_its_body() {
    let mut mesh = ConformanceMesh::start().await;
    let mirror = mesh.recorder("mirror", Duration::ZERO).await;
    mesh.apply("route.yaml", &mirror_route(""));
    let client = mesh.client();
    // Until the route applies, echo-v2 answers too and nothing is copied.
    eventually(
        Duration::from_secs(5),
        "the route's mirror fires",
        || async {
            client.get(&svc("echo"), "/").await?;
            match mirror.seen.lock().unwrap().len() {
                0 => Err("no copy yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // Copies still in flight would land in the count below.
    tokio::time::sleep(Duration::from_millis(200)).await;
    mirror.seen.lock().unwrap().clear();
    let mut sent = Vec::new();
    for i in 0..10 {
        let body = Bytes::from(format!("body {i} ").repeat(1000 * (i + 1)));
        let answer = client
            .request(
                http::Method::POST,
                &svc("echo"),
                &format!("/upload/{i}"),
                &[],
                body.clone(),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        let echoed: Echoed = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            echoed.pod, "echo-v1",
            "the client hears the backend, not the mirror"
        );
        sent.push(("POST".to_string(), format!("/upload/{i}"), body));
    }
    let seen = eventually(Duration::from_secs(5), "every copy arrives", || async {
        let seen = mirror.seen.lock().unwrap().clone();
        match seen.len() {
            10 => Ok(seen),
            n => Err(format!("{n} of 10 copies")),
        }
    })
    .await;
    let mut seen = seen;
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    sent.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        seen, sent,
        "each copy has the request's method, path and body"
    );
    let admin = mesh.echo[0].proxy.admin_addr;
    let answered = [("dst_service", "mirror"), ("result", "answered")];
    eventually(Duration::from_secs(2), "copies are counted", || async {
        match metric(admin, "trellis_request_mirrors_total", &answered).await {
            n if n >= 10.0 => Ok(()),
            n => Err(format!("{n} answered copies counted")),
        }
    })
    .await;
}

/// Latencies of `n` requests of `client` to echo, in order; each must
/// succeed from echo-v1.
async fn latencies(client: &AppClient, n: usize, body: Bytes) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let answer = client
            .request(
                http::Method::POST,
                &svc("echo"),
                &format!("/{i}"),
                &[],
                body.clone(),
            )
            .await
            .unwrap();
        took.push(started.elapsed());
        assert_eq!(answer.status, 200, "{}", answer.text());
        let echoed: Echoed = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(echoed.pod, "echo-v1");
    }
    took
}

fn median(mut took: Vec<Duration>) -> Duration {
    took.sort();
    took[took.len() / 2]
}

/// A mirror that takes 2 s to answer (and to read the body) neither slows
/// nor fails the requests it copies: copies that cannot keep up with a
/// large body are abandoned, not waited for. A mirror that is down is the
/// same.
#[tokio::test]
async fn a_slow_or_missing_mirror_never_slows_or_fails_the_request() {
    let mut mesh = ConformanceMesh::start().await;
    let mirror = mesh.recorder("mirror", Duration::from_secs(2)).await;
    let client = mesh.client();
    let small = Bytes::from_static(b"small body");
    let large = Bytes::from(vec![b'x'; 4 << 20]);
    // The same route without its mirror first: the baseline, and warm
    // connections.
    mesh.apply(
        "route.yaml",
        &mirror_route("")
            .replace("RequestMirror", "RequestHeaderModifier")
            .replace(
                "requestMirror: {backendRef: {name: mirror, port: 80}}",
                "requestHeaderModifier: {set: [{name: x-plain, value: \"1\"}]}",
            ),
    );
    eventually(
        Duration::from_secs(5),
        "the plain route applies",
        || async {
            let answer = client.get(&svc("echo"), "/").await?;
            let echoed: Echoed = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
            match echoed.header("x-plain") {
                Some(_) => Ok(()),
                None => Err("not yet".to_string()),
            }
        },
    )
    .await;
    latencies(&client, 5, small.clone()).await;
    let baseline = median(latencies(&client, 20, small.clone()).await);
    let baseline_large = median(latencies(&client, 5, large.clone()).await);
    mesh.apply("route.yaml", &mirror_route(", percent: 100"));
    let admin = mesh.echo[0].proxy.admin_addr;
    let copies = |result: &'static str| async move {
        let filter = [("dst_service", "mirror"), ("result", result)];
        metric(admin, "trellis_request_mirrors_total", &filter).await
    };
    eventually(
        Duration::from_secs(10),
        "the mirror route applies",
        || async {
            latencies(&client, 1, small.clone()).await;
            match mirror.seen.lock().unwrap().len() {
                0 => Err("no copy reached the mirror yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    let mirrored = median(latencies(&client, 20, small.clone()).await);
    let mirrored_large = latencies(&client, 5, large.clone()).await;
    let slowest = mirrored_large.iter().max().copied().unwrap();
    assert!(
        mirrored < baseline * 3 + Duration::from_millis(20),
        "mirrored median {mirrored:?} vs {baseline:?} without"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a 4 MiB upload waited for the 2 s mirror: {slowest:?} (median without {baseline_large:?})"
    );
    // A body larger than the copy's path can hold while the mirror is not
    // reading (flow-control windows and socket buffers, a few MiB) leaves
    // its copy behind by more than it may lag: the copy is abandoned.
    latencies(&client, 1, Bytes::from(vec![b'x'; 16 << 20])).await;
    eventually(
        Duration::from_secs(10),
        "large copies are abandoned",
        || async {
            match copies("abandoned").await {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("{n} abandoned")),
            }
        },
    )
    .await;
    // A mirror that is down: its one endpoint refuses connections.
    let nobody = mesh.mesh.pod_ip();
    mesh.apply(
        "gone.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: gone, namespace: {MESH_NS}}}
spec:
  ports: [{{name: http, port: 80, appProtocol: http, targetPort: 9}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: gone-1
  namespace: {MESH_NS}
  labels: {{kubernetes.io/service-name: gone}}
addressType: IPv4
endpoints:
  - addresses: [\"{nobody}\"]
ports: [{{name: http, port: 9, appProtocol: http}}]
"
        ),
    );
    mesh.apply(
        "route.yaml",
        &mirror_route("").replace("name: mirror", "name: gone"),
    );
    let gone = [("dst_service", "gone"), ("result", "failed")];
    eventually(
        Duration::from_secs(10),
        "the down mirror's route applies",
        || async {
            latencies(&client, 1, small.clone()).await;
            match metric(admin, "trellis_request_mirrors_total", &gone).await {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("{n} failed copies")),
            }
        },
    )
    .await;
    let down = median(latencies(&client, 20, small.clone()).await);
    assert!(
        down < baseline * 3 + Duration::from_millis(20),
        "with the mirror down: median {down:?} vs {baseline:?} without"
    );
    drop(mirror);
}

/// `timeouts.backendRequest` bounds one attempt: a backend slower than it
/// gets a 504 `timeout` well before the request timeout; with retries, each
/// attempt gets its own.
#[tokio::test]
async fn backend_request_timeout_bounds_each_attempt() {
    let mut mesh = ConformanceMesh::start().await;
    let slow = mesh.recorder("slow", Duration::from_secs(2)).await;
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-backend-timeout",
            "  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 5s, backendRequest: 300ms}
    backendRefs: [{name: slow, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /retried}}]
    timeouts: {request: 5s, backendRequest: 300ms}
    retry: {attempts: 2, codes: [503]}
    backendRefs: [{name: slow, port: 80}]
",
        ),
    );
    let client = mesh.client();
    let timed_out = |path: &'static str| Case {
        status: 504,
        response_headers: vec![("trellis-proxy-error", "timeout")],
        ..Case::get(path, svc("echo"), path)
    };
    expect(&client, &timed_out("/slow")).await;
    let started = Instant::now();
    timed_out("/slow").check(&client).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "one attempt: {took:?}"
    );
    slow.seen.lock().unwrap().clear();
    let started = Instant::now();
    timed_out("/retried").check(&client).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "three attempts of 300 ms: {took:?}"
    );
    let admin = mesh.echo[0].proxy.admin_addr;
    let filter = [("dst_service", "echo")];
    assert!(metric(admin, "trellis_retries_total", &filter).await >= 2.0);
}
