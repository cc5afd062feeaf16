//! Identity and mTLS end to end: what a STRICT inbound refuses, hops that
//! verify the exact SPIFFE ID, and certificate, issuer and root rotation
//! under load with zero failed requests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_control_plane::identity;
use trellis_proto::SpiffeId;
use trellis_tests::tls::{client, foreign_identity, try_request};
use trellis_tests::*;

/// A certificate for `id` from the mesh's own CA, valid for `lifetime`.
#[tokio::test]
async fn strict_inbound_serves_mesh_clients_and_refuses_everyone_else() {
    let mesh = HelloMesh::start().await;
    let inbound = mesh.hello[0].1.inbound_addr;
    let frontend = SpiffeId::new(TRUST_DOMAIN, "default", "frontend");

    // The control: a current mesh certificate is served.
    let valid = mesh_identity(&mesh, &frontend, Duration::from_secs(60));
    assert_eq!(
        try_request(client(Some(valid)), inbound, mesh.port).await,
        Ok(200)
    );

    // Plaintext HTTP/1.1 gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plaintext was served"
    );

    let no_cert = try_request(client(None), inbound, mesh.port).await;
    assert!(
        no_cert.is_err(),
        "a client without certificate was served: {no_cert:?}"
    );

    let foreign = foreign_identity(&frontend.to_string());
    let result = try_request(client(Some(foreign)), inbound, mesh.port).await;
    assert!(
        result.is_err(),
        "a foreign CA's certificate was served: {result:?}"
    );

    let expired = mesh_identity(&mesh, &frontend, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let result = try_request(client(Some(expired)), inbound, mesh.port).await;
    assert!(
        result.is_err(),
        "an expired certificate was served: {result:?}"
    );
}

#[tokio::test]
async fn a_peer_with_another_identity_than_discovery_names_is_refused() {
    let mut mesh = Mesh::start().await;
    let client_ip = mesh.pod_ip();
    let frontend = mesh.proxy(client_ip, "frontend").await;
    let ip = mesh.pod_ip();
    let app = hello_app(ip, "v1").await;
    // The pod claims service account `hello`, but its proxy is `impostor`:
    // it holds a valid mesh certificate, just not the expected one.
    let impostor = mesh.proxy(ip, "impostor").await;
    mesh.write_manifest(
        "hello.yaml",
        &(pod_yaml("hello-v1", "hello", "v1", impostor.inbound_addr.port())
            + "---\n"
            + &service_yaml("hello", app.port(), &[("hello-v1", ip)])),
    );
    let client = AppClient::http1(frontend.outbound_addr);
    client
        .wait_routable(&format!("hello.default.svc.cluster.local:{}", app.port()))
        .await;
    let answer = client
        .get(
            &format!("hello.default.svc.cluster.local:{}", app.port()),
            "/",
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 502, "{}", answer.text());
    let text = answer.text();
    assert!(
        text.contains("spiffe://cluster.local/ns/default/sa/impostor")
            && text.contains("spiffe://cluster.local/ns/default/sa/hello"),
        "the error names both identities: {text}"
    );
    assert_eq!(answer.headers["trellis-proxy-error"], "tls");
    // …and the refusal is counted on the client's side.
    let failures = metric(
        frontend.admin_addr,
        "trellis_tls_handshake_failures_total",
        &[("direction", "outbound")],
    )
    .await;
    assert!(failures >= 1.0, "{failures}");
}

/// Steady traffic through the mesh, recording every failure.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyLoad {
    fn start(mesh: &HelloMesh) -> Self {
        let (stop, ok, failures): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<Mutex<Vec<String>>>) =
            Default::default();
        let workers = (0..3)
            .map(|_| {
                let (client, authority) = (mesh.http1(), mesh.authority());
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client.version(&authority).await {
                            Ok(_) => drop(ok.fetch_add(1, Ordering::Relaxed)),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            workers,
        }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed requests, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        assert!(
            self.ok.load(Ordering::Relaxed) > 300,
            "too little traffic to tell"
        );
    }
}

/// A certificate a proxy installed.
#[derive(Clone, Debug)]
struct Installed {
    issuer: String,
    serial: String,
    /// Whether it was already expired when installed (must never happen).
    expired: bool,
}

/// The certificates a proxy installs, in order, starting with the current one.
fn record_certificates(proxy: &trellis_proxy::Proxy) -> Arc<Mutex<Vec<Installed>>> {
    let seen: Arc<Mutex<Vec<Installed>>> = Arc::default();
    let mut changes = proxy.identity.subscribe();
    let record = {
        let seen = seen.clone();
        move |tls: Option<Arc<trellis_proxy::tls::TlsConfigs>>| {
            let Some(tls) = tls else { return };
            let (_, cert) = x509_parser::parse_x509_certificate(&tls.leaf_der).unwrap();
            seen.lock().unwrap().push(Installed {
                issuer: cert.issuer().to_string(),
                serial: cert.raw_serial_as_string(),
                expired: tls.not_after <= std::time::SystemTime::now(),
            });
        }
    };
    record(changes.borrow_and_update().clone());
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            record(changes.borrow_and_update().clone());
        }
    });
    seen
}

async fn short_lived_mesh() -> HelloMesh {
    HelloMesh::start_tuned(|config| config.leaf_lifetime = Duration::from_secs(2)).await
}

#[tokio::test]
async fn ten_certificate_rotations_under_load_fail_no_request() {
    let mesh = short_lived_mesh().await;
    let seen = record_certificates(&mesh.client);
    let load = SteadyLoad::start(&mesh);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 11 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than 10 rotations in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.finish().await;
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|c| !c.expired),
        "an expired certificate was installed"
    );
    let serials: BTreeSet<String> = seen.iter().map(|c| c.serial.clone()).collect();
    assert!(serials.len() >= 11, "each rotation is a new certificate");
}

#[tokio::test]
async fn issuer_and_root_rotation_under_load_fail_no_request() {
    let mesh = short_lived_mesh().await;
    let dir = mesh.dir.path().to_path_buf();
    let seen = record_certificates(&mesh.hello[0].1);
    let load = SteadyLoad::start(&mesh);
    let issuer_of =
        |seen: &Arc<Mutex<Vec<Installed>>>| seen.lock().unwrap().last().unwrap().issuer.clone();
    let first = issuer_of(&seen);
    // Each step waits for two leaf lifetimes, so every proxy renews (and
    // picks up the new bundle) before the next step.
    let settle = Duration::from_secs(5);

    identity::rotate_issuer(&dir, Duration::from_secs(24 * 3600)).unwrap();
    tokio::time::sleep(settle).await;
    identity::add_root(&dir).unwrap();
    tokio::time::sleep(settle).await;
    identity::activate_next_root(&dir).unwrap();
    tokio::time::sleep(settle).await;
    identity::retire_old_roots(&dir).unwrap();
    tokio::time::sleep(settle).await;

    load.finish().await;
    assert_ne!(
        issuer_of(&seen),
        first,
        "leaves now come from the new issuer"
    );
    let bundle = std::fs::read_to_string(dir.join("bundle.crt")).unwrap();
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        1,
        "the old root is gone from the bundle"
    );
}

#[tokio::test]
async fn permissive_inbound_refuses_plaintext_that_names_its_own_port() {
    let mut mesh = Mesh::start().await;
    let ip = mesh.pod_ip();
    let app = hello_app(ip, "v1").await;
    let proxy = mesh
        .proxy_with(ip, "hello", |env| {
            env.insert(trellis_proxy::config::INBOUND_MODE, "permissive".into());
        })
        .await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(proxy.inbound_addr)
        .await
        .unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: hello\r\ntrellis-dst-port: {}\r\ntrellis-client-id: spiffe://cluster.local/ns/default/sa/admin\r\nConnection: close\r\n\r\n",
        app.port()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    // Plaintext to the inbound port itself names no redirected port: it
    // may not choose one with the in-band header.
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(
        response.contains("trellis-proxy-error: plaintext-target"),
        "{response}"
    );

    let frontend = SpiffeId::new(TRUST_DOMAIN, "default", "frontend");
    let valid = mesh_identity(&mesh, &frontend, Duration::from_secs(60));
    assert_eq!(
        try_request(client(Some(valid)), proxy.inbound_addr, app.port()).await,
        Ok(200)
    );
}

#[tokio::test]
async fn opaque_tcp_tunnels_through_the_inbound_side() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut mesh = Mesh::start().await;
    let ip = mesh.pod_ip();
    // A raw TCP echo server as the app.
    let echo_port = echo_app(ip).await;
    let proxy = mesh.proxy(ip, "echo").await;
    let frontend = SpiffeId::new(TRUST_DOMAIN, "default", "frontend");
    let config = trellis_tests::tls::client_with_alpn(
        Some(mesh_identity(&mesh, &frontend, Duration::from_secs(60))),
        trellis_proxy::tls::ALPN_OPAQUE,
    );
    let tcp = tokio::net::TcpStream::connect(proxy.inbound_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(proxy.inbound_addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(&echo_port.to_be_bytes()).await.unwrap();
    tls.write_all(b"ping over an opaque tunnel").await.unwrap();
    let mut buf = vec![0u8; 26];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping over an opaque tunnel");
}

/// The application learns who called from its own sidecar only: a
/// `trellis-client-id` the calling application sent itself is replaced by
/// the identity its sidecar proved, over HTTP/1.1 and HTTP/2 alike.
#[tokio::test]
async fn a_client_id_the_client_sent_is_replaced_by_the_verified_one() {
    let mesh = trellis_tests::HelloMesh::start_with_apps(|listener, _version| {
        tokio::spawn(trellis_common::serve::serve(
            listener,
            |request: http::Request<hyper::body::Incoming>| async move {
                let ids: Vec<&str> = request
                    .headers()
                    .get_all(trellis_proxy::http::CLIENT_ID)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                http::Response::new(trellis_proxy::http::full(ids.join(",")))
            },
        ));
    })
    .await;
    let authority = mesh.authority();
    let forged = [(
        "trellis-client-id",
        "spiffe://cluster.local/ns/default/sa/admin",
    )];
    for client in [
        AppClient::http1(mesh.client.outbound_addr),
        AppClient::http2(mesh.client.outbound_addr),
    ] {
        client.wait_routable(&authority).await;
        let answer = client.get_with(&authority, "/", &forged).await.unwrap();
        assert_eq!(
            answer.text(),
            "spiffe://cluster.local/ns/default/sa/frontend",
            "the application sees the proven identity, once"
        );
    }
}
