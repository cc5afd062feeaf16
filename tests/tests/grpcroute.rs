//! GRPCRoute end to end: Gateway API's mesh conformance tests for it
//! (`conformance/tests/mesh/grpcroute-*.go`, each test naming its file),
//! and method matching, with real sidecars in front of gRPC servers and
//! clients on Python's grpcio (C core, `tests/apps/grpc_conformance.py`);
//! and grpcio using the sidecar as its `http_proxy` (CONNECT).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use trellis_tests::conformance::*;
use trellis_tests::{eventually, grpcio_available, GRPC_PYTHON};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/apps/grpc_conformance.py");

/// The Service `echo`'s gRPC port as a client names it.
fn authority() -> String {
    format!("{}:7070", svc("echo"))
}

/// A GRPCRoute attached to the Service `echo`'s port 7070, with `rules`.
fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: {name}, namespace: {MESH_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 7070}}]
  rules:
{rules}"
    )
}

/// The conformance mesh with a gRPC echo server in each echo pod (on the
/// Services' `grpc` port); `None` when grpcio is missing outside CI.
async fn grpc_mesh() -> Option<(ConformanceMesh, Vec<tokio::process::Child>)> {
    if !grpcio_available() {
        return None;
    }
    let mesh = ConformanceMesh::start().await;
    let mut servers = Vec::new();
    for pod in &mesh.echo {
        let addr = SocketAddr::new(pod.ip, mesh.grpc_port).to_string();
        let mut server = tokio::process::Command::new(GRPC_PYTHON)
            .args([APP, "serve", &addr, pod.name])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gRPC server");
        let stdout = server.stdout.take().expect("its stdout");
        let line = BufReader::new(stdout).lines().next_line().await;
        let line = line.expect("read its stdout").unwrap_or_default();
        assert!(line.starts_with("port "), "the gRPC server said {line:?}");
        servers.push(server);
    }
    Some((mesh, servers))
}

/// What one call got: its status code's name, and the echo's reply.
#[derive(Debug, Deserialize)]
struct Call {
    code: String,
    reply: Option<Reply>,
}

#[derive(Debug, Deserialize)]
struct Reply {
    pod: String,
    method: String,
    metadata: BTreeMap<String, Vec<String>>,
}

impl Reply {
    /// A metadata name's values joined by commas, as upstream compares them.
    fn header(&self, name: &str) -> Option<String> {
        self.metadata.get(name).map(|values| values.join(","))
    }
}

/// `n` unary calls of `method` with `metadata` to the Service `echo`
/// through the sidecar at `proxy` (a pod's outbound listener).
async fn calls(proxy: SocketAddr, method: &str, n: usize, metadata: &[(&str, &str)]) -> Vec<Call> {
    calls_by("call", proxy, method, n, metadata).await
}

/// [`calls`] made as `how` says: `call` (the sidecar as the server) or
/// `connect` (the sidecar as the client's HTTP proxy).
async fn calls_by(
    how: &str,
    proxy: SocketAddr,
    method: &str,
    n: usize,
    metadata: &[(&str, &str)],
) -> Vec<Call> {
    let pairs = metadata.iter().map(|(k, v)| format!("{k}={v}"));
    let out = tokio::process::Command::new(GRPC_PYTHON)
        .args([APP, how, &proxy.to_string(), &authority(), method])
        .arg(n.to_string())
        .args(pairs)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the gRPC client");
    assert!(
        out.status.success(),
        "the gRPC client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a call's JSON line"))
        .collect()
}

/// The single call's reply, or why it is not OK.
async fn call(proxy: SocketAddr, method: &str, metadata: &[(&str, &str)]) -> Result<Reply, String> {
    let mut got = calls(proxy, method, 1, metadata).await;
    match got.pop() {
        Some(Call {
            reply: Some(reply), ..
        }) => Ok(reply),
        other => Err(format!("{method}: {other:?}")),
    }
}

/// grpcroute-weight.go: 70/30 across echo-v1 and echo-v2; echo-v3 does
/// not exist and has weight 0, so it takes no traffic and refuses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroute_weight() {
    let Some((mesh, _servers)) = grpc_mesh().await else {
        return;
    };
    mesh.apply(
        "route.yaml",
        &route(
            "mesh-grpc-weighted-backends",
            "  - backendRefs:
    - {name: echo-v1, port: 7070, weight: 70}
    - {name: echo-v2, port: 7070, weight: 30}
    - {name: echo-v3, port: 7070, weight: 0}
",
        ),
    );
    let client = mesh.echo[0].proxy.outbound_addr;
    // Upstream allows each backend's share to be off by 5 points.
    let shares = eventually(Duration::from_secs(20), "a 70/30 split", || async {
        let got = calls(client, "/svc.Echo/Weighted", 1000, &[]).await;
        let mut shares: BTreeMap<String, f64> = BTreeMap::new();
        for call in &got {
            let Some(reply) = &call.reply else {
                return Err(format!("a call failed: {}", call.code));
            };
            *shares.entry(reply.pod.clone()).or_default() += 100.0 / got.len() as f64;
        }
        let v1 = shares.get("echo-v1").copied().unwrap_or(0.0);
        if got.len() == 1000 && (v1 - 70.0).abs() <= 5.0 {
            Ok(shares)
        } else {
            Err(format!("{} calls: {shares:?}", got.len()))
        }
    })
    .await;
    let v2 = shares.get("echo-v2").copied().unwrap_or(0.0);
    assert!((v2 - 30.0).abs() <= 5.0, "{shares:?}");
    assert_eq!(shares.len(), 2, "{shares:?}");
}

/// grpcroute-request-header-modifier.go: rules chosen by the
/// `x-test-case` header set, add and remove request metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroute_request_header_modifier() {
    let Some((mesh, _servers)) = grpc_mesh().await else {
        return;
    };
    let rule = |case: &str, backend: &str, modifier: &str| {
        format!(
            "  - matches: [{{headers: [{{name: x-test-case, value: {case}}}]}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {modifier}}}]
    backendRefs: [{{name: {backend}, port: 7070}}]
"
        )
    };
    mesh.apply(
        "route.yaml",
        &route(
            "grpc-request-header-modifier",
            &[
                rule("set", "echo-v1", "{set: [{name: x-header-set, value: set-overwrites-values}]}"),
                rule("add", "echo-v1", "{add: [{name: x-header-add, value: add-appends-values}]}"),
                rule("remove", "echo-v1", "{remove: [x-header-remove]}"),
                rule(
                    "multi",
                    "echo-v2",
                    "{set: [{name: x-header-set-1, value: header-set-1}, {name: x-header-set-2, value: header-set-2}], \
                     add: [{name: x-header-add-1, value: header-add-1}, {name: x-header-add-2, value: header-add-2}], \
                     remove: [x-header-remove-1, x-header-remove-2]}",
                ),
            ]
            .concat(),
        ),
    );
    struct GrpcCase {
        client: usize,
        sent: &'static [(&'static str, &'static str)],
        backend: &'static str,
        seen: &'static [(&'static str, &'static str)],
        absent: &'static [&'static str],
    }
    let cases = [
        GrpcCase {
            client: 0,
            sent: &[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "this-value-should-be-overwritten"),
            ],
            backend: "echo-v1",
            seen: &[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "set-overwrites-values"),
            ],
            absent: &[],
        },
        GrpcCase {
            client: 0,
            sent: &[
                ("x-test-case", "add"),
                ("x-header-add", "this-value-should-be-appended"),
            ],
            backend: "echo-v1",
            seen: &[(
                "x-header-add",
                "this-value-should-be-appended,add-appends-values",
            )],
            absent: &[],
        },
        GrpcCase {
            client: 0,
            sent: &[
                ("x-test-case", "remove"),
                ("x-header-remove", "this-should-be-removed"),
            ],
            backend: "echo-v1",
            seen: &[("x-test-case", "remove")],
            absent: &["x-header-remove"],
        },
        GrpcCase {
            client: 1,
            sent: &[
                ("x-test-case", "multi"),
                ("x-header-set-2", "set-header-2"),
                ("x-header-add-2", "add-header-2"),
                ("x-header-remove-2", "should-be-removed-2"),
            ],
            backend: "echo-v2",
            seen: &[
                ("x-header-set-1", "header-set-1"),
                ("x-header-set-2", "header-set-2"),
                ("x-header-add-1", "header-add-1"),
                ("x-header-add-2", "add-header-2,header-add-2"),
            ],
            absent: &["x-header-remove-1", "x-header-remove-2"],
        },
    ];
    for case in &cases {
        let client = mesh.echo[case.client].proxy.outbound_addr;
        let name = case.sent[0].1;
        eventually(Duration::from_secs(10), name, || async {
            let reply = call(client, "/svc.Echo/Modified", case.sent).await?;
            let wrong = |why: String| Err(format!("{name}: {why}; got {reply:?}"));
            if reply.pod != case.backend {
                return wrong(format!("not answered by {}", case.backend));
            }
            for (header, value) in case.seen {
                if reply.header(header).as_deref() != Some(*value) {
                    return wrong(format!("{header} is not {value:?}"));
                }
            }
            if let Some(header) = case.absent.iter().find(|h| reply.header(h).is_some()) {
                return wrong(format!("{header} must be absent"));
            }
            Ok(())
        })
        .await;
    }
}

/// Method matches: a service and method exactly, a whole service, and
/// regular expressions; a method no rule matches is UNIMPLEMENTED (the
/// route owns the port, so nothing falls through to the Service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroute_matches_methods() {
    let Some((mesh, _servers)) = grpc_mesh().await else {
        return;
    };
    mesh.apply(
        "route.yaml",
        &route(
            "grpc-methods",
            "  - matches: [{method: {service: trellis.Echo, method: Ping}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {service: trellis.Other}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - matches: [{method: {type: RegularExpression, service: trellis\\.E.*, method: Pong.*}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - matches: [{method: {method: Any}}]
    backendRefs: [{name: echo-v1, port: 7070}]
",
        ),
    );
    let client = mesh.echo[0].proxy.outbound_addr;
    let cases = [
        ("/trellis.Echo/Ping", "echo-v1"),
        ("/trellis.Other/Ping", "echo-v2"),
        ("/trellis.Echo/PongLong", "echo-v2"),
        ("/another.Service/Any", "echo-v1"),
    ];
    for (method, backend) in cases {
        eventually(Duration::from_secs(10), method, || async {
            let reply = call(client, method, &[]).await?;
            if reply.pod == backend && reply.method == method {
                Ok(())
            } else {
                Err(format!("{method}: not {backend}'s echo: {reply:?}"))
            }
        })
        .await;
    }
    // Neither a prefix of a service nor of a method matches.
    for method in ["/trellis.OtherX/Ping", "/trellis.Echo/PingX"] {
        let got = calls(client, method, 1, &[]).await;
        assert_eq!(got[0].code, "UNIMPLEMENTED", "{method}: {got:?}");
    }
}

/// grpc-core with `http_proxy` pointing at the sidecar tunnels through it
/// with CONNECT: every call is answered, balanced per request over both
/// pods, and each server's sidecar counts it as mTLS from the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_through_the_sidecar_as_its_http_proxy() {
    let Some((mesh, _servers)) = grpc_mesh().await else {
        return;
    };
    let client = mesh.echo[0].proxy.outbound_addr;
    let got = calls_by("connect", client, "/svc.Echo/Tunnelled", 40, &[]).await;
    let mut pods = BTreeMap::new();
    for call in &got {
        let reply = call.reply.as_ref().unwrap_or_else(|| panic!("{got:?}"));
        *pods.entry(reply.pod.clone()).or_insert(0) += 1;
        let identity = reply.header("trellis-client-id");
        assert_eq!(
            identity.as_deref(),
            Some("spiffe://cluster.local/ns/gateway-conformance-mesh/sa/default"),
            "{reply:?}"
        );
    }
    assert_eq!(got.len(), 40, "{got:?}");
    assert_eq!(
        pods.len(),
        2,
        "one tunnel, requests balanced over both pods: {pods:?}"
    );
    let mut served = 0.0;
    for pod in &mesh.echo {
        let filter = [
            ("direction", "inbound"),
            ("tls", "true"),
            ("status_code", "0"),
            ("classification", "success"),
        ];
        served +=
            trellis_tests::metric(pod.proxy.admin_addr, "trellis_requests_total", &filter).await;
    }
    assert_eq!(served, 40.0, "gRPC OKs counted by the servers' sidecars");
}
