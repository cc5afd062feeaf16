//! `CONNECT` on the explicit proxy, with real curl as the client: a tunnel
//! to a mesh Service (or pod) carries mTLS to the chosen endpoint, and
//! what runs inside it is routed per request like any other traffic; a
//! destination outside the mesh is refused unless egress is allowed.
//! (gRPC clients through `http_proxy`: `tests/tests/grpcroute.rs`.)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use meshctl::demo::apps::Greeting;
use trellis_proxy::config::CONNECT_EGRESS;
use trellis_tests::*;

/// `curl -p -x` through the client's sidecar: each URL's answer, one
/// per line, and whether curl succeeded.
async fn curl_tunnelled(mesh: &HelloMesh, extra: &[&str], urls: &[String]) -> (bool, String) {
    let proxy = format!("http://{}", mesh.client.outbound_addr);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n", "-p", "-x", &proxy])
        .args(extra)
        .args(urls)
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs (Debian: apt-get install -y curl)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// GETs over HTTP/2 inside one CONNECT tunnel to `authority`, until
/// `enough` says so: every answer, in order.
async fn h2_through_connect(
    proxy: SocketAddr,
    authority: &str,
    enough: impl Fn(&[Greeting]) -> bool,
) -> Vec<Greeting> {
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tcp.write_all(connect.as_bytes())
        .await
        .expect("send CONNECT");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("the CONNECT answer"));
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("HTTP/2 inside the tunnel");
    tokio::spawn(connection);
    let answers = std::sync::Mutex::new(Vec::new());
    eventually(Duration::from_secs(10), "enough answers", || async {
        let request = http::Request::get(format!("http://{authority}/"))
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = sender
            .clone()
            .send_request(request)
            .await
            .expect("an answer");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let mut answers = answers.lock().unwrap();
        answers.push(serde_json::from_slice(&body).expect("a greeting"));
        match enough(&answers) {
            true => Ok(()),
            false => Err(format!("{} answers so far", answers.len())),
        }
    })
    .await;
    answers.into_inner().unwrap()
}

fn greetings(text: &str) -> Vec<Greeting> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {text}")))
        .collect()
}

/// Inbound requests `hello`'s sidecars served over mTLS from the client.
async fn served_from_frontend(mesh: &HelloMesh) -> f64 {
    let mut total = 0.0;
    for (_, proxy) in &mesh.hello {
        let filter = [
            ("direction", "inbound"),
            ("tls", "true"),
            (
                "peer_identity",
                "spiffe://cluster.local/ns/default/sa/frontend",
            ),
        ];
        total += metric(proxy.admin_addr, "trellis_requests_total", &filter).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_tunnels_to_a_mesh_service_over_mtls_and_requests_inside_are_routed() {
    let mesh = HelloMesh::start().await;
    let url = format!("http://{}/", mesh.authority());
    let client = mesh.client.admin_addr;
    let outbound = [
        ("direction", "outbound"),
        ("dst_service", "hello"),
        ("tls", "true"),
    ];
    let (served_before, sent_before) = (
        served_from_frontend(&mesh).await,
        metric(client, "trellis_requests_total", &outbound).await,
    );

    // HTTP/1.1 inside the tunnel: the hello pods see the client's identity.
    let (ok, text) = curl_tunnelled(&mesh, &[], &vec![url.clone(); 4]).await;
    assert!(ok, "{text}");
    let answers = greetings(&text);
    assert_eq!(answers.len(), 4, "{text}");
    for answer in &answers {
        assert_eq!(
            answer.client_identity, "spiffe://cluster.local/ns/default/sa/frontend",
            "{text}"
        );
    }
    assert_eq!(served_from_frontend(&mesh).await - served_before, 4.0);

    // HTTP/2 inside one tunnel: each request is balanced on its own, so
    // one connection's requests reach both versions. (curl 7.88 cannot
    // reuse an HTTP/2 connection through a proxy tunnel, so hyper's client
    // speaks it here; grpcio does the same in `grpcroute.rs`.) Paced, not a
    // burst: the balancer rightly prefers the pod that answered faster
    // until that estimate fades.
    let both = BTreeSet::from(["v1".to_string(), "v2".to_string()]);
    let versions = |answers: &[Greeting]| -> BTreeSet<String> {
        answers.iter().map(|g| g.version.clone()).collect()
    };
    let answers = h2_through_connect(mesh.client.outbound_addr, &mesh.authority(), |a| {
        versions(a) == both
    })
    .await;
    let sent = metric(client, "trellis_requests_total", &outbound).await;
    assert_eq!(
        sent - sent_before,
        4.0 + answers.len() as f64,
        "each request counted as the Service's"
    );

    // A tunnel to one pod by its IP gets that pod, over mTLS.
    let (ip, _) = &mesh.hello[1];
    let url = format!("http://{ip}:{}/", mesh.port);
    let (ok, text) = curl_tunnelled(&mesh, &[], &[url]).await;
    assert!(ok, "{text}");
    let answer = &greetings(&text)[0];
    assert_eq!(answer.version, "v2", "{text}");
    assert!(!answer.client_identity.is_empty(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_outside_the_mesh_is_refused_unless_egress_is_allowed() {
    // Outside the mesh: an address no pod has.
    let outside = hello_app("127.0.0.1".parse().unwrap(), "outside").await;
    let mesh = HelloMesh::start().await;
    let answer = exchange_raw(
        mesh.client.outbound_addr,
        &format!("CONNECT {outside} HTTP/1.1\r\nHost: {outside}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 403")
            && answer.contains("trellis-proxy-error: connect-refused")
            && answer.contains("TRELLIS_CONNECT_EGRESS"),
        "{answer}"
    );
    let (ok, text) = curl_tunnelled(&mesh, &[], &[format!("http://{outside}/")]).await;
    assert!(!ok && text.contains("403"), "{text}");

    let mesh = HelloMesh::start_with_proxy_env(vec![(CONNECT_EGRESS, "allow".into())]).await;
    let (ok, text) = curl_tunnelled(&mesh, &[], &[format!("http://{outside}/")]).await;
    assert!(ok, "{text}");
    let answer = &greetings(&text)[0];
    assert_eq!(answer.version, "outside");
    assert_eq!(
        answer.client_identity, "",
        "straight to the destination, no mTLS"
    );
}

#[tokio::test]
async fn connect_is_served_only_by_the_explicit_proxy() {
    let mesh = HelloMesh::start().await;
    let authority = mesh.authority();
    // A CONNECT sent to a hello pod's inbound side is not tunnelled.
    let inbound = mesh.hello[0].1.inbound_addr;
    let answer = exchange_raw(
        inbound,
        &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "the inbound side opened a tunnel: {answer}"
    );
}

/// What an HTTPS client sends through `HTTPS_PROXY` (its own TLS) is
/// opaque to the sidecar: the tunnel carries it over mTLS to one endpoint
/// as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applications_own_tls_passes_through_the_tunnel_untouched() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = HelloMesh::start_with_apps(|listener, _| {
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = tcp.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
    })
    .await;
    let authority = mesh.authority();
    let open_before = inbound_open(&mesh).await;
    let mut tcp = tokio::net::TcpStream::connect(mesh.client.outbound_addr)
        .await
        .expect("connect");
    let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    tcp.write_all(connect.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("the CONNECT answer"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A TLS record header, then bytes no HTTP parser would take.
    let hello = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00 and the rest of a ClientHello";
    tcp.write_all(hello).await.expect("send the client's TLS");
    let mut echoed = vec![0u8; hello.len()];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_exact(&mut echoed),
    )
    .await
    .expect("echoed within 5 s")
    .expect("echoed");
    assert_eq!(echoed, hello);
    assert_eq!(
        inbound_open(&mesh).await - open_before,
        1.0,
        "the tunnel is a connection to a hello pod's sidecar"
    );
}

/// The connections `hello`'s sidecars hold open on their inbound side.
async fn inbound_open(mesh: &HelloMesh) -> f64 {
    let mut open = 0.0;
    for (_, proxy) in &mesh.hello {
        let filter = [("direction", "inbound")];
        open += metric(proxy.admin_addr, "trellis_tcp_open_connections", &filter).await;
    }
    open
}
