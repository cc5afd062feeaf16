//! The control plane over TLS: proxies verify the controller's certificate
//! (chain to the bundle they were given, SPIFFE ID of the controller's
//! service account) and refuse one they do not trust; plaintext gRPC is
//! served only to loopback peers in local mode. Real TLS, real sockets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use trellis_control_plane::transport::Plaintext;
use trellis_proxy::config::{
    CONTROLLER, CONTROLLER_IDENTITY, CONTROLLER_TRUST, CONTROLLER_TRUST_PEM,
};
use trellis_tests::{eventually, metric, AppClient, Mesh};

const CONTROLLER_REFUSED: &str = "trellis_controller_connections_refused_total";

/// The proxy's `/ready`: status and body.
async fn ready(admin: SocketAddr) -> Result<(u16, String), String> {
    let answer = AppClient::http1(admin)
        .get(&admin.to_string(), "/ready")
        .await?;
    Ok((answer.status.as_u16(), answer.text()))
}

/// Starts a proxy with `tune`d variables and waits until `/ready` says it
/// has no certificate because of something containing `cause`.
async fn refused_with(
    mesh: &mut Mesh,
    tune: impl FnOnce(&mut HashMap<&'static str, String>),
    cause: &str,
) -> trellis_proxy::Proxy {
    let ip = mesh.pod_ip();
    let proxy = trellis_proxy::start(mesh.proxy_config(ip, "hello", tune))
        .await
        .expect("proxy starts");
    let admin = proxy.admin_addr;
    eventually(Duration::from_secs(10), "the proxy says why", || async {
        match ready(admin).await? {
            (503, body) if body.contains(cause) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(proxy.identity.current().is_none(), "no certificate");
    proxy
}

#[tokio::test]
async fn a_proxy_whose_bundle_is_another_ca_refuses_the_controller() {
    // Two meshes, two CAs: a proxy of mesh `a` pointed at mesh `b`'s controller.
    let mut a = Mesh::start().await;
    let b = Mesh::start().await;
    let b_admin = b.controller.as_ref().expect("controller").admin_addr;
    let other = format!("https://{}", b.controller_addr());
    let _proxy = refused_with(
        &mut a,
        |env| {
            env.insert(CONTROLLER, other);
        },
        // UnknownIssuer, or BadSignature when both roots were made in the
        // same second and so share a name.
        "invalid peer certificate",
    )
    .await;
    let (_, body) = ready(_proxy.admin_addr).await.expect("ready");
    assert!(
        body.contains(CONTROLLER_TRUST) && body.contains("must hold the bundle"),
        "the fix is named: {body}"
    );
    // The controller saw the handshake fail (the proxy's alert).
    eventually(
        Duration::from_secs(5),
        "the controller counts the failed handshake",
        || async {
            let n = metric(b_admin, CONTROLLER_REFUSED, &[("reason", "handshake")]).await;
            (n >= 1.0).then_some(()).ok_or(format!("{n}"))
        },
    )
    .await;

    // The same proxy configuration with the right bundle gets a certificate.
    let ip = a.pod_ip();
    a.proxy(ip, "hello").await;
}

/// A proxy given the mesh's current bundle as PEM text in a variable, as
/// the injector configures a sidecar.
async fn proxy_with_inline_bundle(mesh: &mut Mesh) -> trellis_proxy::Proxy {
    let bundle = mesh
        .dir
        .path()
        .join(trellis_control_plane::identity::BUNDLE);
    let pem = std::fs::read_to_string(&bundle).expect("the mesh's bundle");
    let ip = mesh.pod_ip();
    mesh.proxy_with(ip, "hello", |env| {
        env.remove(CONTROLLER_TRUST);
        env.insert(CONTROLLER_TRUST_PEM, pem);
    })
    .await
}

#[tokio::test]
async fn a_proxy_given_the_bundle_inline_trusts_the_controller() {
    // As the injector configures a sidecar: the PEM text in a variable.
    let mut mesh = Mesh::start().await;
    let proxy = proxy_with_inline_bundle(&mut mesh).await;
    assert!(proxy.identity.current().is_some(), "a certificate");

    // Inline text that holds no certificate is a start error naming it.
    let ip = mesh.pod_ip();
    let config = mesh.proxy_config(ip, "hello", |env| {
        env.remove(CONTROLLER_TRUST);
        env.insert(CONTROLLER_TRUST_PEM, "not a PEM bundle".into());
    });
    let error = trellis_proxy::start(config)
        .await
        .err()
        .expect("a bundle without certificates is refused")
        .to_string();
    assert!(error.contains(CONTROLLER_TRUST_PEM), "{error}");
}

#[tokio::test]
async fn a_controller_certificate_with_another_spiffe_id_is_refused() {
    let mut mesh = Mesh::start_with(|c| c.service_account = "impostor".into()).await;
    let _proxy = refused_with(
        &mut mesh,
        |_| {},
        "is spiffe://cluster.local/ns/trellis/sa/impostor, not spiffe://cluster.local/ns/trellis/sa/trellis-controller",
    )
    .await;

    // Told to expect that identity, a proxy accepts it.
    let ip = mesh.pod_ip();
    mesh.proxy_with(ip, "hello", |env| {
        env.insert(
            CONTROLLER_IDENTITY,
            "spiffe://cluster.local/ns/trellis/sa/impostor".into(),
        );
    })
    .await;
}

#[tokio::test]
async fn an_identity_refusal_names_its_reason_and_is_counted() {
    let mut mesh = Mesh::start().await;
    let admin = mesh.controller.as_ref().expect("controller").admin_addr;
    let frontend = trellis_proto::SpiffeId::new(trellis_tests::TRUST_DOMAIN, "default", "frontend");
    let stolen = mesh.tokens.token_for(&frontend);
    let _proxy = refused_with(
        &mut mesh,
        |env| {
            env.insert(trellis_proxy::config::TOKEN, stolen);
        },
        "(PermissionDenied): identity-mismatch: the token does not prove identity spiffe://cluster.local/ns/default/sa/hello",
    )
    .await;
    let family = "trellis_controller_certificates_refused_total";
    assert!(metric(admin, family, &[("reason", "identity-mismatch")]).await >= 1.0);
    assert_eq!(
        metric(admin, family, &[("reason", "invalid-token")]).await,
        0.0
    );
}

/// An address of this machine that is not loopback, or `None` (which
/// fails the test under CI).
fn non_loopback_ip() -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output();
    let ip = out.ok().and_then(|out| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next()?.parse().ok())
    });
    if ip.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI machines need a non-loopback IPv4 address (and iproute2) for this test"
        );
        eprintln!("skipped: no non-loopback IPv4 address on this machine");
    }
    ip
}

/// Opens a plaintext discovery watch at `url` and reads its first message.
async fn plaintext_watch(url: String) -> Result<(), String> {
    let mut stream =
        trellis_tests::watch_endpoints(&url, "hello.default.svc.cluster.local:8080").await?;
    stream.message().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test]
async fn plaintext_discovery_is_served_to_loopback_only() {
    let Some(ip) = non_loopback_ip() else { return };
    let mut mesh =
        Mesh::start_with(|c| c.listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await;
    let admin = mesh.controller.as_ref().expect("controller").admin_addr;
    let port = mesh.controller_addr().port();

    plaintext_watch(format!("http://127.0.0.1:{port}"))
        .await
        .expect("plaintext from loopback is served in local mode");
    let error = plaintext_watch(format!("http://{ip}:{port}"))
        .await
        .expect_err("plaintext from a non-loopback address is refused");
    assert!(
        error.contains("INADEQUATE_SECURITY") && error.contains("only from loopback in local mode"),
        "the client learns why: {error}"
    );
    assert_eq!(
        metric(admin, CONTROLLER_REFUSED, &[("reason", "plaintext")]).await,
        1.0
    );

    // From the same address over TLS, a proxy is served.
    let pod = mesh.pod_ip();
    mesh.proxy_with(pod, "hello", |env| {
        env.insert(CONTROLLER, format!("https://{ip}:{port}"));
    })
    .await;
}

#[tokio::test]
async fn without_local_mode_loopback_plaintext_is_refused_too() {
    let mesh = Mesh::start_with(|c| c.plaintext = Plaintext::Refused).await;
    let admin = mesh.controller.as_ref().expect("controller").admin_addr;
    let error = plaintext_watch(format!("http://{}", mesh.controller_addr()))
        .await
        .expect_err("refused");
    assert!(error.contains("never in this mode"), "{error}");
    assert_eq!(
        metric(admin, CONTROLLER_REFUSED, &[("reason", "plaintext")]).await,
        1.0
    );
}

/// The chain the controller at `addr` presents to a new TLS connection.
async fn served_chain(addr: SocketAddr) -> Vec<Vec<u8>> {
    let config = trellis_tests::tls::client_with_alpn(None, b"h2");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .expect("certificates")
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

#[tokio::test]
async fn the_controller_re_issues_its_certificate_when_the_issuer_rotates() {
    let mut mesh = Mesh::start().await;
    let addr = mesh.controller_addr();
    let before = served_chain(addr).await;
    trellis_control_plane::identity::rotate_issuer(mesh.dir.path(), Duration::from_secs(3600))
        .expect("rotate");
    let issuer = std::fs::read_to_string(mesh.dir.path().join("issuer.crt")).expect("issuer");
    let (_, issuer) = x509_parser::pem::parse_x509_pem(issuer.as_bytes()).expect("pem");
    let after = eventually(
        Duration::from_secs(5),
        "the controller serves a certificate from the new issuer",
        || async {
            let chain = served_chain(addr).await;
            (chain[1] == issuer.contents)
                .then_some(chain)
                .ok_or("still the old issuer".to_string())
        },
    )
    .await;
    assert_ne!(before[0], after[0], "a new leaf");
    // Proxies started after the rotation verify it against the same bundle.
    let ip = mesh.pod_ip();
    mesh.proxy(ip, "hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_given_the_bundle_inline_follows_a_root_rotation_without_a_restart() {
    use trellis_control_plane::controller::ControllerConfig;
    use trellis_control_plane::identity;
    // Short leaves, so the proxy renews (and learns the bundle) quickly.
    let tune = |config: &mut ControllerConfig| config.leaf_lifetime = Duration::from_secs(2);
    let mut mesh = Mesh::start_with(tune).await;
    let dir = mesh.dir.path().to_path_buf();
    // As injected: the bundle of the day the pod started, inline.
    let proxy = proxy_with_inline_bundle(&mut mesh).await;
    let anchors = |proxy: &trellis_proxy::Proxy| {
        proxy
            .identity
            .current()
            .map_or(0, |c| c.trust_anchors_der.len())
    };
    assert_eq!(anchors(&proxy), 1);

    // A new root joins the bundle; the proxy's next certificate brings it.
    identity::add_root(&dir).expect("add a root");
    eventually(
        Duration::from_secs(10),
        "the proxy learns the new root",
        || {
            let n = anchors(&proxy);
            async move { (n == 2).then_some(()).ok_or(format!("{n} anchors")) }
        },
    )
    .await;
    // The new root signs, the controller re-issues its certificate from it
    // and restarts: a fresh connection meets a certificate the inline
    // bundle does not know.
    identity::activate_next_root(&dir).expect("activate the new root");
    let old = mesh.controller.take().expect("the controller");
    let (listen, admin) = (old.addr, old.admin_addr);
    old.stop();
    let mut config = ControllerConfig::local(&dir, listen.ip());
    tune(&mut config);
    (config.listen, config.admin) = (listen, admin);
    mesh.controller = Some(trellis_tests::ControllerProcess::start(config));

    let before = proxy.identity.current().expect("a certificate").not_after;
    eventually(
        Duration::from_secs(15),
        "the proxy renews from the restarted controller",
        || {
            let renewed = proxy
                .identity
                .current()
                .is_some_and(|c| c.not_after > before + Duration::from_secs(1));
            let why = proxy.identity.last_error().map(|e| e.to_string());
            async move { renewed.then_some(()).ok_or(format!("last error: {why:?}")) }
        },
    )
    .await;
}
