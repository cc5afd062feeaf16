//! Identity in cluster mode, against the fake API server through the real
//! kube-rs client, over real TLS: proxies prove who they are with
//! service-account tokens the API server reviews (audience `trellis.dev`),
//! and the CA's issuer and roots come from a Secret and a ConfigMap that
//! can be rotated — or broken — while it signs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Code;
use trellis_control_plane::controller::{Controller, ControllerConfig, Source};
use trellis_control_plane::identity::{self, Ca, AUDIENCE, BUNDLE};
use trellis_control_plane::transport::Plaintext;
use trellis_proto::identity::identity_client::IdentityClient;
use trellis_proto::identity::{CertifyRequest, CertifyResponse};
use trellis_proto::SpiffeId;
use trellis_proxy::config::{ControllerAddress, ControllerTls, TrustBundle};
use trellis_tests::cluster_ca::{issuer_secret, publish_issuer, publish_roots};
use trellis_tests::fake_api::FakeApi;
use trellis_tests::{
    eventually, hello_app, init_tracing, metric, pod_yaml, service_yaml, AppClient, Mesh,
    TRUST_DOMAIN,
};

const REFUSED: &str = "trellis_controller_certificates_refused_total";
const ISSUED: &str = "trellis_controller_certificates_issued_total";
const ISSUER_UPDATES: &str = "trellis_controller_issuer_updates_total";
const HELLO: &str = "spiffe://cluster.local/ns/default/sa/hello";
const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";

/// A mesh in cluster mode: its controller watches a fake API server that
/// holds the issuer Secret and roots ConfigMap, made from the operator's
/// CA files in `mesh.dir` (whose `bundle.crt` is the ConfigMap as a proxy
/// has it mounted).
struct Cluster {
    mesh: Mesh,
}

impl Cluster {
    async fn start(tune: impl FnOnce(&mut ControllerConfig)) -> Self {
        let api = Arc::new(FakeApi::start().await);
        let mesh = Mesh::start_in_cluster_with(api, |config| {
            config.plaintext = Plaintext::Refused;
            tune(config);
        })
        .await;
        Self { mesh }
    }

    fn api(&self) -> &FakeApi {
        self.mesh.api.as_ref().expect("the API server")
    }

    /// Stops the API server for good.
    fn stop_api(&mut self) {
        self.mesh.api = None;
    }

    fn dir(&self) -> &Path {
        self.mesh.dir.path()
    }

    fn bundle(&self) -> PathBuf {
        self.dir().join(BUNDLE)
    }

    fn admin(&self) -> SocketAddr {
        self.mesh
            .controller
            .as_ref()
            .expect("controller")
            .admin_addr
    }

    async fn certify(
        &self,
        identity: &str,
        csr_for: &str,
        token: &str,
    ) -> Result<CertifyResponse, tonic::Status> {
        certify(
            self.mesh.controller_addr(),
            &self.bundle(),
            identity,
            csr_for,
            token,
        )
        .await
    }

    async fn refused(&self, reason: &str) -> f64 {
        metric(self.admin(), REFUSED, &[("reason", reason)]).await
    }

    async fn issuer_updates(&self, result: &str) -> f64 {
        metric(self.admin(), ISSUER_UPDATES, &[("result", result)]).await
    }

    /// Waits until a certificate for hello passes `check`, and returns it.
    async fn wait_for(
        &self,
        what: &str,
        check: impl Fn(&CertifyResponse) -> bool,
    ) -> CertifyResponse {
        eventually(Duration::from_secs(5), what, || async {
            let response = self
                .certify(HELLO, HELLO, "hello-token")
                .await
                .map_err(|s| s.to_string())?;
            check(&response)
                .then_some(response)
                .ok_or("not yet".to_string())
        })
        .await
    }

    /// Waits until the controller signs with the issuer now in `dir`.
    async fn wait_for_issuer(&self, what: &str) -> CertifyResponse {
        let issuer = pem_der(&self.dir().join("issuer.crt"));
        self.wait_for(what, |r| r.chain_der[1] == issuer).await
    }

    /// Waits until the controller hands out the roots now in `dir`.
    async fn wait_for_roots(&self, what: &str) -> CertifyResponse {
        let text = std::fs::read(self.bundle()).expect("bundle");
        let roots: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(&text)
            .map(|pem| pem.expect("PEM").contents)
            .collect();
        self.wait_for(what, |r| r.trust_anchors_der == roots).await
    }
}

/// One Certify call over TLS that verifies the controller against `bundle`.
async fn certify(
    controller: SocketAddr,
    bundle: &Path,
    identity: &str,
    csr_for: &str,
    token: &str,
) -> Result<CertifyResponse, tonic::Status> {
    let address = ControllerAddress {
        url: format!("https://{controller}"),
        tls: Some(ControllerTls {
            trust_bundle: TrustBundle::File(bundle.to_path_buf()),
            identity: SpiffeId::default_controller(TRUST_DOMAIN),
        }),
    };
    // No certificate yet: the bundle alone is trusted.
    let (_, no_certificate) = tokio::sync::watch::channel(None);
    let channel = trellis_proxy::control::channel(&address, no_certificate).expect("a channel");
    let csr_for = csr_for.parse().expect("a SPIFFE ID");
    let (_, csr_der) = trellis_proxy::tls::generate_csr(&csr_for).expect("a CSR");
    let request = CertifyRequest {
        identity: identity.into(),
        token: token.into(),
        csr_der,
    };
    let mut client = IdentityClient::new(channel);
    tokio::time::timeout(Duration::from_secs(10), client.certify(request))
        .await
        .expect("the controller answers within 10 s")
        .map(tonic::Response::into_inner)
}

fn pem_der(path: &Path) -> Vec<u8> {
    let text = std::fs::read(path).expect("PEM file");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).expect("PEM");
    pem.contents
}

/// The URI SANs of a DER certificate.
fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    let san = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.to_string(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect()
}

fn signed_by(der: &[u8], issuer_der: &[u8]) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer_der).expect("a certificate");
    cert.verify_signature(Some(issuer.public_key())).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_service_accounts_own_token_gets_its_certificate() {
    let mut cluster = Cluster::start(|_| {}).await;
    let api = cluster.api();
    let sa = |name: &str| format!("system:serviceaccount:default:{name}");
    api.add_token("hello-token", &sa("hello"), &[AUDIENCE], true);
    api.add_token("frontend-token", &sa("frontend"), &[AUDIENCE], true);
    api.add_token("vault-token", &sa("hello"), &["vault"], true);
    api.add_token("expired-token", &sa("hello"), &[AUDIENCE], false);

    let elsewhere = "spiffe://elsewhere.example/ns/default/sa/hello";
    let cases = [
        // what, identity asked for, CSR for, token, code, reason
        (
            "another service account's token",
            HELLO,
            HELLO,
            "frontend-token",
            Code::PermissionDenied,
            "identity-mismatch",
        ),
        (
            "a token for another audience",
            HELLO,
            HELLO,
            "vault-token",
            Code::Unauthenticated,
            "wrong-audience",
        ),
        (
            "an unauthenticated (expired) token",
            HELLO,
            HELLO,
            "expired-token",
            Code::Unauthenticated,
            "invalid-token",
        ),
        (
            "a CSR asking for another identity",
            HELLO,
            FRONTEND,
            "hello-token",
            Code::InvalidArgument,
            "bad-csr",
        ),
        (
            "another trust domain",
            elsewhere,
            elsewhere,
            "hello-token",
            Code::PermissionDenied,
            "foreign-trust-domain",
        ),
    ];
    for (what, identity, csr_for, token, code, reason) in cases {
        let status = cluster
            .certify(identity, csr_for, token)
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{reason}: ")),
            "{what}: the status names the reason: {}",
            status.message()
        );
        assert_eq!(cluster.refused(reason).await, 1.0, "{what} is counted");
    }

    let response = cluster
        .certify(HELLO, HELLO, "hello-token")
        .await
        .expect("the right token is certified");
    assert_eq!(uri_sans(&response.chain_der[0]), [HELLO]);
    let issuer = pem_der(&cluster.dir().join("issuer.crt"));
    assert_eq!(
        response.chain_der[1], issuer,
        "signed by the Secret's issuer"
    );
    assert!(signed_by(&response.chain_der[0], &issuer));
    let root = pem_der(&cluster.bundle());
    assert_eq!(response.trust_anchors_der, [root], "the ConfigMap's roots");
    assert_eq!(metric(cluster.admin(), ISSUED, &[]).await, 1.0);
    // Every request was reviewed by the API server.
    assert_eq!(api.requests("create", "tokenreviews"), 6);

    // Without the API server, a review cannot happen: UNAVAILABLE, not the proxy's fault.
    cluster.stop_api();
    let status = cluster
        .certify(HELLO, HELLO, "hello-token")
        .await
        .expect_err("no review, no certificate");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("review-failed: "),
        "{status:?}"
    );
    assert_eq!(cluster.refused("review-failed").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_follows_its_secret_and_config_map_and_a_bad_secret_is_refused() {
    let cluster = Cluster::start(|_| {}).await;
    let (api, dir) = (cluster.api(), cluster.dir());
    api.add_token(
        "hello-token",
        "system:serviceaccount:default:hello",
        &[AUDIENCE],
        true,
    );
    let first = cluster.wait_for_issuer("the first issuer signs").await;
    let old_root = pem_der(&cluster.bundle());

    // A new issuer under the same root: the Secret alone changes.
    identity::rotate_issuer(dir, Duration::from_secs(3600)).expect("rotate the issuer");
    publish_issuer(api, dir);
    let rotated = cluster.wait_for_issuer("the new issuer signs").await;
    assert_ne!(rotated.chain_der[1], first.chain_der[1]);
    assert!(signed_by(&rotated.chain_der[1], &old_root));
    assert_eq!(cluster.issuer_updates("applied").await, 1.0);

    // A new root: first into the ConfigMap, then an issuer under it, then
    // the old root out. Each step reaches new certificates.
    identity::add_root(dir).expect("add a root");
    publish_roots(api, dir);
    let both = cluster.wait_for_roots("both roots are handed out").await;
    assert_eq!(both.trust_anchors_der.len(), 2);
    identity::activate_next_root(dir).expect("activate the new root");
    publish_issuer(api, dir);
    let under_new_root = cluster.wait_for_issuer("the new root's issuer signs").await;
    let new_root = under_new_root.trust_anchors_der[1].clone();
    assert!(signed_by(&under_new_root.chain_der[1], &new_root));
    identity::retire_old_roots(dir).expect("retire the old root");
    publish_roots(api, dir);
    // This also needs the controller's own certificate re-issued under the
    // new root: the client trusts nothing else now.
    let only_new = cluster
        .wait_for_roots("only the new root is handed out")
        .await;
    assert_eq!(only_new.trust_anchors_der, [new_root]);
    assert_eq!(cluster.issuer_updates("applied").await, 4.0);

    // Bad Secrets are refused, counted, and the current issuer signs on.
    let cert = std::fs::read_to_string(dir.join("issuer.crt")).expect("issuer.crt");
    let key = std::fs::read_to_string(dir.join("issuer.key")).expect("issuer.key");
    let other_key = rcgen::KeyPair::generate().expect("a key").serialize_pem();
    let foreign = tempfile::tempdir().expect("tempdir");
    Ca::load_or_create(foreign.path(), TRUST_DOMAIN).expect("another CA");
    let foreign_cert = std::fs::read_to_string(foreign.path().join("issuer.crt")).expect("cert");
    let foreign_key = std::fs::read_to_string(foreign.path().join("issuer.key")).expect("key");
    let bad = [
        (
            "a key that is not the certificate's",
            issuer_secret("kubernetes.io/tls", &cert, &other_key),
        ),
        (
            "an issuer no root in the ConfigMap signed",
            issuer_secret("kubernetes.io/tls", &foreign_cert, &foreign_key),
        ),
        (
            "no PEM at all",
            issuer_secret("kubernetes.io/tls", "not a certificate", &key),
        ),
        ("an Opaque Secret", issuer_secret("Opaque", &cert, &key)),
    ];
    for (n, (what, secret)) in bad.into_iter().enumerate() {
        api.apply(secret);
        eventually(Duration::from_secs(5), what, || async {
            let rejected = cluster.issuer_updates("rejected").await;
            (rejected == (n + 1) as f64)
                .then_some(())
                .ok_or(format!("{rejected} rejected"))
        })
        .await;
        let response = cluster
            .certify(HELLO, HELLO, "hello-token")
            .await
            .unwrap_or_else(|s| panic!("after {what}, signing goes on: {s:?}"));
        assert_eq!(
            response.chain_der[1], under_new_root.chain_der[1],
            "after {what}, the current issuer signs"
        );
    }
    assert_eq!(cluster.issuer_updates("applied").await, 4.0);

    // Fixed, it is used again.
    identity::rotate_issuer(dir, Duration::from_secs(3600)).expect("rotate the issuer");
    publish_issuer(api, dir);
    cluster
        .wait_for_issuer("a good Secret after bad ones signs")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_certificates_with_rotating_token_files_and_talk_mtls() {
    // Short certificates, so renewals (and token re-reads) happen in the test.
    let lifetime = Duration::from_secs(3);
    let mut cluster = Cluster::start(|c| c.leaf_lifetime = lifetime).await;
    // The harness gives each sidecar a token file the API server knows.
    let ip = cluster.mesh.pod_ip();
    let app = hello_app(ip, "v1").await;
    let hello = cluster.mesh.proxy(ip, "hello").await;
    let frontend_ip = cluster.mesh.pod_ip();
    let frontend = cluster.mesh.proxy(frontend_ip, "frontend").await;
    let docs = [
        pod_yaml("hello-v1", "hello", "v1", hello.inbound_addr.port()),
        service_yaml("hello", app.port(), &[("hello-v1", ip)]),
    ];
    cluster.api().apply_yaml(&docs.join("---\n"));
    let client = AppClient::http1(frontend.outbound_addr);
    let authority = format!("hello.default.svc.cluster.local:{}", app.port());
    client.wait_routable(&authority).await;
    let greeting = client
        .get(&authority, "/")
        .await
        .expect("a request through both sidecars")
        .greeting()
        .expect("hello's greeting");
    assert_eq!(
        greeting.client_identity, FRONTEND,
        "hello's sidecar verified the frontend's certificate"
    );

    // The kubelet rotates hello's token; the old one is then revoked. Its
    // next certificates are issued on the new token, read from the file.
    let username = "system:serviceaccount:default:hello";
    let old = std::fs::read_to_string(cluster.mesh.token_file("hello")).expect("token file");
    std::fs::write(cluster.mesh.token_file("hello"), "hello-token-2\n").expect("token file");
    cluster
        .api()
        .add_token("hello-token-2", username, &[AUDIENCE], true);
    cluster.api().add_token(&old, username, &[AUDIENCE], false);
    let revoked = SystemTime::now();
    eventually(
        Duration::from_secs(10),
        "hello renews on its rotated token",
        || async {
            let current = hello.identity.current().ok_or("no certificate")?;
            // Issued at least a second after the old token was revoked.
            (current.not_after >= revoked + lifetime + Duration::from_secs(1))
                .then_some(())
                .ok_or(format!("valid until {:?}", current.not_after))
        },
    )
    .await;
    let answer = client.get(&authority, "/").await.expect("still served");
    assert_eq!(answer.status.as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_secret_the_controller_says_what_to_create() {
    init_tracing();
    let api = FakeApi::start().await;
    let state_dir = tempfile::tempdir().expect("tempdir");
    let mut config = ControllerConfig::local(state_dir.path(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let url = api.url().parse().expect("the fake API's URL");
    config.source = Source::Cluster(Box::new(kube::Config::new(url)));
    let error = Controller::start(config)
        .await
        .err()
        .expect("no issuer, no controller");
    assert_eq!(
        error.to_string(),
        "Secret trellis/trellis-identity-issuer does not exist; create it: \
         kubectl -n trellis create secret tls trellis-identity-issuer --cert=issuer.crt --key=issuer.key"
    );
}
