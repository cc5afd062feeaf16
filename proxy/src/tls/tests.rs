//! mTLS between real rustls configurations over loopback sockets, with certificates from a test CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_proto::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use super::test_ca::{spiffe, unix_now, TestCa};
use super::verify::SpiffeServerVerifier;
use super::*;

const PATIENCE: Duration = Duration::from_secs(10);

/// Accepts one TLS connection on 127.0.0.1 and answers "ping" with "pong".
/// The task's result is the client's SPIFFE ID as the server saw it and the
/// negotiated ALPN protocol, or why the connection failed.
async fn serve_once(
    server: Arc<ServerConfig>,
) -> (SocketAddr, JoinHandle<Result<(SpiffeId, Vec<u8>), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = stream.get_ref();
        let client = peer_identity(session.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let alpn = session.alpn_protocol().unwrap_or_default().to_vec();
        let mut ping = [0; 4];
        stream
            .read_exact(&mut ping)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&ping, b"ping");
        stream.write_all(b"pong").await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok((client, alpn))
    });
    (addr, task)
}

/// Whether a round trip works on an established client stream. In TLS 1.3
/// the client finishes before the server has judged its certificate, so a
/// refusal by the server shows up here, not in the handshake.
async fn ping(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> bool {
    let mut pong = [0; 4];
    stream.write_all(b"ping").await.is_ok()
        && stream.read_exact(&mut pong).await.is_ok()
        && &pong == b"pong"
}

async fn server_result(
    task: JoinHandle<Result<(SpiffeId, Vec<u8>), String>>,
) -> Result<(SpiffeId, Vec<u8>), String> {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the server side did not finish")
        .unwrap()
}

/// Connects with `configs` and expects `expected`; reports the connect
/// error or whether a round trip worked.
async fn dial(
    configs: &TlsConfigs,
    addr: SocketAddr,
    expected: &SpiffeId,
    alpn: &[u8],
) -> Result<bool, TlsError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connect(configs, tcp, expected, alpn).await?;
    Ok(ping(&mut stream).await)
}

/// A client configuration that trusts `ca` but presents an arbitrary chain
/// (or none), to put the server's verifier to the test directly.
fn raw_client(ca: &TestCa, client_auth: Option<(Vec<Vec<u8>>, &KeyPair)>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in ca.trust_anchors() {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            Arc::new(roots),
            &provider,
        )));
    let mut config = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Runs a raw client against `server`; returns whether a round trip worked
/// and what the server made of it.
async fn raw_exchange(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (bool, Result<(SpiffeId, Vec<u8>), String>) {
    let (addr, task) = serve_once(server).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("peer.trellis.invalid").unwrap();
    let client_ok = match TlsConnector::from(client).connect(name, tcp).await {
        Ok(mut stream) => ping(&mut stream).await,
        Err(_) => false,
    };
    (client_ok, server_result(task).await)
}

#[tokio::test]
async fn mtls_handshake_shows_each_side_the_other_identity() {
    let ca = TestCa::new("mesh");
    let (client_id, server_id) = (spiffe("frontend"), spiffe("backend"));
    let client = ca.configs(&client_id);
    let server = ca.configs(&server_id);

    let (addr, task) = serve_once(server.server.clone()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connect(&client, tcp, &server_id, ALPN_H2)
        .await
        .expect("mTLS handshake");
    let (_, session) = stream.get_ref();
    assert_eq!(
        peer_identity(session.peer_certificates().unwrap()).unwrap(),
        server_id
    );
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert!(ping(&mut stream).await, "round trip over mTLS failed");

    let (seen, alpn) = server_result(task)
        .await
        .expect("server accepted the client");
    assert_eq!(seen, client_id, "the server saw the wrong client identity");
    assert_eq!(alpn, ALPN_H2);
}

#[tokio::test]
async fn opaque_alpn_is_negotiated_when_asked() {
    let ca = TestCa::new("mesh");
    let server = ca.configs(&spiffe("backend"));
    let client = ca.configs(&spiffe("frontend"));
    let (addr, task) = serve_once(server.server.clone()).await;
    assert!(dial(&client, addr, &spiffe("backend"), ALPN_OPAQUE)
        .await
        .unwrap());
    assert_eq!(server_result(task).await.unwrap().1, ALPN_OPAQUE);
}

#[tokio::test]
async fn client_refuses_a_peer_with_another_identity() {
    let ca = TestCa::new("mesh");
    let server = ca.configs(&spiffe("impostor"));
    let client = ca.configs(&spiffe("frontend"));
    let (addr, _task) = serve_once(server.server.clone()).await;
    match dial(&client, addr, &spiffe("backend"), ALPN_H2).await {
        Err(TlsError::UnexpectedPeer { expected, actual }) => {
            assert_eq!(*expected, spiffe("backend"));
            assert_eq!(*actual, spiffe("impostor"));
        }
        other => panic!("expected UnexpectedPeer, got {other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_a_client_without_certificate() {
    let ca = TestCa::new("mesh");
    let server = ca.configs(&spiffe("backend"));
    let (client_ok, server) = raw_exchange(server.server.clone(), raw_client(&ca, None)).await;
    assert!(!client_ok, "a client without certificate got an answer");
    let error = server.expect_err("the server accepted a client without certificate");
    assert!(error.starts_with("handshake: "), "{error}");
    assert!(error.contains("no certificate"), "{error}");
}

#[tokio::test]
async fn server_refuses_a_client_certificate_from_a_foreign_ca() {
    let (mesh, foreign) = (TestCa::new("mesh"), TestCa::new("foreign"));
    let server = mesh.configs(&spiffe("backend"));
    // The client trusts the mesh (so it accepts the server) but its own
    // certificate comes from elsewhere.
    let (key, csr) = generate_csr(&spiffe("frontend")).unwrap();
    let now = unix_now();
    let chain = foreign.sign(&csr, now - 60, now + 3600);
    let client = TlsConfigs::new(spiffe("frontend"), chain, &key, mesh.trust_anchors()).unwrap();

    let (addr, task) = serve_once(server.server.clone()).await;
    let client_ok = dial(&client, addr, &spiffe("backend"), ALPN_H2)
        .await
        .unwrap_or(false);
    assert!(
        !client_ok,
        "a client with a foreign certificate got an answer"
    );
    let error = server_result(task)
        .await
        .expect_err("the server accepted a foreign client certificate");
    assert!(error.starts_with("handshake: "), "{error}");
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn server_refuses_an_expired_client_certificate() {
    let ca = TestCa::new("mesh");
    let server = ca.configs(&spiffe("backend"));
    let now = unix_now();
    let client = ca.configs_valid(&spiffe("frontend"), now - 7200, now - 3600);

    let (addr, task) = serve_once(server.server.clone()).await;
    let client_ok = dial(&client, addr, &spiffe("backend"), ALPN_H2)
        .await
        .unwrap_or(false);
    assert!(
        !client_ok,
        "a client with an expired certificate got an answer"
    );
    let error = server_result(task)
        .await
        .expect_err("the server accepted an expired client certificate");
    assert!(error.starts_with("handshake: "), "{error}");
    assert!(error.to_lowercase().contains("expired"), "{error}");
}

#[tokio::test]
async fn server_refuses_a_client_certificate_without_spiffe_id() {
    let ca = TestCa::new("mesh");
    let server = ca.configs(&spiffe("backend"));
    // A valid mesh certificate whose only name is a DNS name.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName("frontend.default.svc".try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    let now = unix_now();
    let chain = ca.sign(csr.der(), now - 60, now + 3600);

    let (client_ok, server) =
        raw_exchange(server.server.clone(), raw_client(&ca, Some((chain, &key)))).await;
    assert!(!client_ok, "a client without SPIFFE ID got an answer");
    let error = server.expect_err("the server accepted a client certificate without SPIFFE ID");
    assert!(error.starts_with("handshake: "), "{error}");
    assert!(error.contains("no URI SAN"), "{error}");
}

#[tokio::test]
async fn client_refuses_a_server_certificate_from_a_foreign_ca() {
    let (mesh, foreign) = (TestCa::new("mesh"), TestCa::new("foreign"));
    let server = foreign.configs(&spiffe("backend"));
    let client = mesh.configs(&spiffe("frontend"));
    let (addr, task) = serve_once(server.server.clone()).await;
    match dial(&client, addr, &spiffe("backend"), ALPN_H2).await {
        Err(TlsError::Handshake(e)) => assert!(e.to_string().contains("UnknownIssuer"), "{e}"),
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    assert!(server_result(task).await.is_err());
}

#[tokio::test]
async fn client_refuses_an_expired_server_certificate() {
    let ca = TestCa::new("mesh");
    let now = unix_now();
    let server = ca.configs_valid(&spiffe("backend"), now - 7200, now - 3600);
    let client = ca.configs(&spiffe("frontend"));
    let (addr, _task) = serve_once(server.server.clone()).await;
    match dial(&client, addr, &spiffe("backend"), ALPN_H2).await {
        Err(TlsError::Handshake(e)) => {
            assert!(e.to_string().to_lowercase().contains("expired"), "{e}")
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
}

#[test]
fn configs_refuse_a_certificate_for_another_identity() {
    let ca = TestCa::new("mesh");
    let (key, csr) = generate_csr(&spiffe("other")).unwrap();
    let now = unix_now();
    let chain = ca.sign(&csr, now - 60, now + 3600);
    match TlsConfigs::new(spiffe("frontend"), chain, &key, ca.trust_anchors()) {
        Err(TlsError::WrongIdentity { requested, issued }) => {
            assert_eq!(*requested, spiffe("frontend"));
            assert_eq!(*issued, spiffe("other"));
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
    let (key, csr) = generate_csr(&spiffe("frontend")).unwrap();
    let chain = ca.sign(&csr, now - 60, now + 3600);
    assert!(matches!(
        TlsConfigs::new(spiffe("frontend"), chain, &key, vec![]),
        Err(TlsError::NoTrustAnchors)
    ));
    assert!(matches!(
        TlsConfigs::new(spiffe("frontend"), vec![], &key, ca.trust_anchors()),
        Err(TlsError::EmptyChain)
    ));
}

#[test]
fn configs_expire_with_the_leaf() {
    let ca = TestCa::new("mesh");
    let now = unix_now();
    let configs = ca.configs_valid(&spiffe("frontend"), now - 60, now + 120);
    let not_after = configs
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(not_after, now + 120);
    assert_eq!(
        peer_identity(&[CertificateDer::from(configs.leaf_der.clone())]).unwrap(),
        spiffe("frontend")
    );
}

#[test]
fn csr_carries_exactly_the_spiffe_uri() {
    let identity = spiffe("frontend");
    let (key, der) = generate_csr(&identity).unwrap();
    let (rest, csr) = X509CertificationRequest::from_der(&der).unwrap();
    assert!(rest.is_empty());
    csr.verify_signature()
        .expect("the CSR is signed by its own key");

    let spki = &csr.certification_request_info.subject_pki;
    assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve, OID_EC_P256);
    assert_eq!(&*spki.subject_public_key.data, key.public_key_raw());

    let extensions: Vec<_> = csr.requested_extensions().unwrap().collect();
    assert_eq!(extensions.len(), 1, "only a SAN extension: {extensions:?}");
    let ParsedExtension::SubjectAlternativeName(san) = extensions[0] else {
        panic!("not a SAN: {:?}", extensions[0]);
    };
    assert_eq!(
        san.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/default/sa/frontend"
        )]
    );

    let (other_key, _) = generate_csr(&identity).unwrap();
    assert_ne!(
        key.public_key_raw(),
        other_key.public_key_raw(),
        "every CSR has a fresh key"
    );
}

#[test]
fn peer_identity_needs_a_certificate() {
    assert!(matches!(peer_identity(&[]), Err(TlsError::NotSpiffe(_))));
    assert!(matches!(
        peer_identity(&[CertificateDer::from(vec![1, 2, 3])]),
        Err(TlsError::NotSpiffe(_))
    ));
}
