//! Authorization by identity, end to end through real sidecars: policies
//! written as manifests (or applied to the API server) reach the `hello`
//! sidecars, which refuse what they do not allow before the app sees it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_proto::SpiffeId;
use trellis_tests::fake_api::FakeApi;
use trellis_tests::*;

/// An AuthorizationPolicy `default/hello` with `spec` (YAML, indented two).
fn policy(spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: hello, namespace: default}}
spec:
{spec}"
    )
}

/// A policy on `hello`'s pods and `port` allowing `from` (one YAML flow
/// item, e.g. `{serviceAccount: {name: frontend}}`).
fn allowing(port: u16, from: &str) -> String {
    policy(&format!(
        "  selector: {{matchLabels: {{app: hello}}}}\n  ports: [{port}]\n  allow:\n    - from: [{from}]\n"
    ))
}

/// The namespace `default` with its default inbound policy.
fn namespace(default: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: default
  annotations: {{trellis.dev/default-inbound-policy: {default}}}
"
    )
}

/// Waits until a GET of `path` through `client` answers `status`.
async fn until_status(client: &AppClient, authority: &str, path: &str, status: u16) -> Answer {
    eventually(
        Duration::from_secs(5),
        &format!("GET {path} answers {status}"),
        || async {
            let answer = client.get(authority, path).await?;
            if answer.status.as_u16() == status {
                Ok(answer)
            } else {
                Err(format!("{}: {}", answer.status, answer.text()))
            }
        },
    )
    .await
}

/// `trellis_inbound_authz_total` summed over both hello sidecars.
async fn authz_count(mesh: &HelloMesh, filter: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for (_, proxy) in &mesh.hello {
        total += metric(proxy.admin_addr, "trellis_inbound_authz_total", filter).await;
    }
    total
}

fn assert_unauthorized(answer: &Answer, names: &str) {
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(
        answer
            .headers
            .get("trellis-proxy-error")
            .map(|v| v.as_bytes()),
        Some(&b"unauthorized"[..]),
        "{:?}",
        answer.headers
    );
    assert!(
        answer.text().contains(names),
        "the reason names {names}: {}",
        answer.text()
    );
}

#[tokio::test]
async fn callers_are_allowed_by_service_account_identity_namespace_or_meshed_and_others_get_403() {
    let mesh = HelloMesh::start().await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);

    mesh.write_manifest(
        "authz.yaml",
        &allowing(port, "{serviceAccount: {name: web}}"),
    );
    let denied = until_status(&client, &authority, "/", 403).await;
    assert_unauthorized(&denied, "AuthorizationPolicy default/hello");
    assert!(
        denied
            .text()
            .contains("spiffe://cluster.local/ns/default/sa/frontend"),
        "the reason names the caller: {}",
        denied.text()
    );

    // A gRPC caller is told in gRPC: PERMISSION_DENIED.
    let grpc = AppClient::http2(mesh.client.outbound_addr)
        .get_with(
            &authority,
            "/hello.Greeter/SayHello",
            &[("content-type", "application/grpc")],
        )
        .await
        .unwrap();
    assert_eq!(
        grpc.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"7"[..]),
        "{:?}",
        grpc.headers
    );

    for from in [
        "{serviceAccount: {name: frontend, namespace: default}}",
        "{identity: \"spiffe://cluster.local/ns/default/sa/frontend\"}",
        "{namespace: default}",
        "{meshed: true}",
    ] {
        mesh.write_manifest("authz.yaml", &allowing(port, from));
        let allowed = until_status(&client, &authority, "/", 200).await;
        assert!(allowed.greeting().is_some(), "{from}: {}", allowed.text());
        mesh.write_manifest("authz.yaml", &allowing(port, "{namespace: elsewhere}"));
        until_status(&client, &authority, "/", 403).await;
    }
    let policy = ("policy", "default/hello");
    assert!(authz_count(&mesh, &[("decision", "allow"), policy, ("mode", "enforce")]).await >= 4.0);
    assert!(authz_count(&mesh, &[("decision", "deny"), policy, ("mode", "enforce")]).await >= 5.0);
}

#[tokio::test]
async fn a_policy_change_applies_within_a_second_to_requests_on_an_open_connection() {
    let mesh = HelloMesh::start().await;
    let (authority, port) = (mesh.authority(), mesh.port);
    // One HTTP/2 connection from the app, and one between the sidecars.
    let client = AppClient::http2(mesh.client.outbound_addr);
    assert_eq!(client.get(&authority, "/").await.unwrap().status, 200);
    let opened = |mesh: &HelloMesh| {
        let proxies: Vec<_> = mesh.hello.iter().map(|(_, p)| p.admin_addr).collect();
        async move {
            let mut total = 0.0;
            for admin in proxies {
                let filter = [("direction", "inbound")];
                total += metric(admin, "trellis_tcp_connections_opened_total", &filter).await;
            }
            total
        }
    };
    // Both versions have been called over their pooled connections.
    for _ in 0..10 {
        assert_eq!(client.get(&authority, "/").await.unwrap().status, 200);
    }
    let connections = opened(&mesh).await;

    let written = Instant::now();
    mesh.write_manifest(
        "authz.yaml",
        &allowing(port, "{serviceAccount: {name: web}}"),
    );
    let denied = until_status(&client, &authority, "/", 403).await;
    let took = written.elapsed();
    assert_unauthorized(&denied, "default/hello");
    assert!(took < Duration::from_secs(1), "the change took {took:?}");
    assert_eq!(
        opened(&mesh).await,
        connections,
        "the denial came on the connections already open"
    );
    println!("a policy change applied in {took:?}");
}

#[tokio::test]
async fn default_deny_covers_selected_ports_only_and_the_namespace_default_rules_the_rest() {
    let mesh = HelloMesh::start().await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);
    let other = port.wrapping_add(1).max(1);
    // A policy that allows nobody, on another port: hello's port keeps the
    // namespace default (everyone).
    mesh.write_manifest(
        "authz.yaml",
        &policy(&format!("  ports: [{other}]\n  allow: []\n")),
    );
    eventually(Duration::from_secs(5), "the policy is loaded", || async {
        let store = &mesh.controller.as_ref().unwrap().store;
        match store.counts().authorization_policies {
            1 => Ok(()),
            n => Err(format!("{n} policies")),
        }
    })
    .await;
    // The store's change is pushed within milliseconds; give it a beat.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.get(&authority, "/").await.unwrap().status, 200);

    mesh.write_manifest("namespace.yaml", &namespace("deny"));
    let denied = until_status(&client, &authority, "/", 403).await;
    assert_unauthorized(&denied, "namespace default is deny");
    let filter = [("decision", "deny"), ("policy", "default:deny")];
    assert!(authz_count(&mesh, &filter).await >= 1.0);

    // The frontend is meshed.
    mesh.write_manifest("namespace.yaml", &namespace("all-meshed"));
    until_status(&client, &authority, "/", 200).await;
    mesh.write_manifest("namespace.yaml", &namespace("deny"));
    until_status(&client, &authority, "/", 403).await;
    mesh.write_manifest("namespace.yaml", &namespace("all-unauthenticated"));
    until_status(&client, &authority, "/", 200).await;

    // Now the policy selects every port: default-deny.
    mesh.write_manifest("authz.yaml", &policy("  allow: []\n"));
    let denied = until_status(&client, &authority, "/", 403).await;
    assert_unauthorized(&denied, "no rule of AuthorizationPolicy default/hello");
}

#[tokio::test]
async fn rules_can_allow_only_some_paths_and_methods() {
    let mesh = HelloMesh::start().await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);
    mesh.write_manifest(
        "authz.yaml",
        &policy(&format!(
            "  ports: [{port}]
  allow:
    - from: [{{serviceAccount: {{name: frontend}}}}]
      to: [{{paths: [{{type: PathPrefix, value: /api}}, {{type: Exact, value: /}}], methods: [GET]}}]
"
        )),
    );
    until_status(&client, &authority, "/apix", 403).await;
    for path in ["/", "/api", "/api/users"] {
        let answer = client.get(&authority, path).await.unwrap();
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.text());
    }
    for path in ["/apix", "/admin", "/index.html"] {
        assert_unauthorized(&client.get(&authority, path).await.unwrap(), path);
    }
    let post = client
        .request(
            http::Method::POST,
            &authority,
            "/api",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_unauthorized(&post, "POST /api");
}

#[tokio::test]
async fn an_audit_policy_allows_everything_and_counts_what_it_would_deny() {
    let mesh = HelloMesh::start().await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);
    mesh.write_manifest(
        "authz.yaml",
        &policy(&format!(
            "  ports: [{port}]\n  mode: Audit\n  allow:\n    - from: [{{serviceAccount: {{name: web}}}}]\n"
        )),
    );
    let audited = [
        ("decision", "deny"),
        ("policy", "default/hello"),
        ("mode", "audit"),
    ];
    eventually(
        Duration::from_secs(5),
        "a would-be denial is counted",
        || async {
            let answer = client.get(&authority, "/").await?;
            if answer.status != 200 {
                return Err(format!("refused: {}", answer.text()));
            }
            match authz_count(&mesh, &audited).await {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("{n} counted")),
            }
        },
    )
    .await;
    let before = authz_count(&mesh, &audited).await;
    let answers = burst(&client, &authority, 20, 2).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| a.status == 200)),
        "audit refuses nothing: {:?}",
        versions(&answers)
    );
    assert_eq!(authz_count(&mesh, &audited).await - before, 20.0);
}

#[tokio::test]
async fn a_malformed_policy_is_rejected_by_file_and_object_and_the_last_good_one_serves() {
    let mesh = HelloMesh::start().await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);
    mesh.write_manifest(
        "authz.yaml",
        &allowing(port, "{serviceAccount: {name: web}}"),
    );
    until_status(&client, &authority, "/", 403).await;

    let mut errors = mesh.controller.as_ref().unwrap().manifest_errors.clone();
    for (bad, says) in [
        (
            policy(&format!("  ports: [{port}]\n  allow:\n    - from: []\n")),
            "authz.yaml: AuthorizationPolicy default/hello: spec.allow[0].from is empty",
        ),
        (
            allowing(port, "{identity: \"spiffe://cluster.local/default/web\"}"),
            "spec.allow[0].from[0].identity",
        ),
        (
            allowing(port, "{serviceAcount: {name: frontend}}"),
            "unknown field `serviceAcount`",
        ),
    ] {
        mesh.write_manifest("authz.yaml", &bad);
        let rejected = eventually(Duration::from_secs(3), says, || {
            let errors = errors.borrow_and_update().clone();
            async move {
                match errors.iter().find(|e| e.to_string().contains(says)) {
                    Some(e) => Ok(e.to_string()),
                    None => Err(format!("{errors:?}")),
                }
            }
        })
        .await;
        assert!(rejected.contains("authz.yaml"), "{rejected}");
        let answer = client.get(&authority, "/").await.unwrap();
        assert_unauthorized(&answer, "default/hello");
    }
}

#[tokio::test]
async fn an_opaque_tcp_tunnel_is_closed_unless_the_policy_allows_its_caller() {
    let mut mesh = Mesh::start().await;
    let ip = mesh.pod_ip();
    let echo_port = echo_app(ip).await;
    let proxy = mesh.proxy(ip, "echo").await;
    // Selecting every pod, so it applies though no Pod object names this one.
    mesh.write_manifest(
        "authz.yaml",
        &policy(&format!(
            "  ports: [{echo_port}]\n  allow:\n    - from: [{{serviceAccount: {{name: web}}}}]\n"
        )),
    );
    let tunnel = |sa: &'static str| {
        let id = SpiffeId::new(TRUST_DOMAIN, "default", sa);
        let config = trellis_tests::tls::client_with_alpn(
            Some(mesh_identity(&mesh, &id, Duration::from_secs(60))),
            trellis_proxy::tls::ALPN_OPAQUE,
        );
        let inbound = proxy.inbound_addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(inbound)
                .await
                .map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::IpAddress(inbound.ip().into());
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(&echo_port.to_be_bytes())
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            match tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await {
                Ok(Ok(_)) => Ok(buf.to_vec()),
                Ok(Err(e)) => Err(format!("closed: {e}")),
                Err(_) => Err("neither echoed nor closed within 5 s".into()),
            }
        }
    };
    eventually(
        Duration::from_secs(5),
        "frontend's tunnel is closed",
        || async {
            match tunnel("frontend").await {
                Err(e) if e.starts_with("closed") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(tunnel("web").await, Ok(b"ping".to_vec()));
    let denied = [("decision", "deny"), ("policy", "default/hello")];
    assert!(metric(proxy.admin_addr, "trellis_inbound_authz_total", &denied).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_through_the_api_server_takes_effect() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let (client, authority, port) = (mesh.http1(), mesh.authority(), mesh.port);
    mesh.write_manifest(
        "authz.yaml",
        &allowing(port, "{serviceAccount: {name: web}}"),
    );
    let denied = until_status(&client, &authority, "/", 403).await;
    assert_unauthorized(&denied, "default/hello");
    mesh.write_manifest(
        "authz.yaml",
        &allowing(port, "{serviceAccount: {name: frontend}}"),
    );
    until_status(&client, &authority, "/", 200).await;
}
