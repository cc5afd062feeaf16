use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::Request;
use trellis_proto::identity::identity_server::Identity;
use trellis_proto::identity::CertifyRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;

/// Picks up the CA files of `dir` as the controller does every second.
fn reload(ca: &Ca, dir: &std::path::Path) -> Result<bool, CaError> {
    ca.replace(IssuerMaterial::from_dir(dir)?)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}
use trellis_proto::SpiffeId;

/// A CSR with the given SANs (`uri:` or `dns:` prefixed).
fn csr(sans: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.split_once(':').unwrap() {
            ("uri", v) => SanType::URI(v.try_into().unwrap()),
            (_, v) => SanType::DnsName(v.try_into().unwrap()),
        })
        .collect();
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[test]
fn leaves_follow_the_x509_svid_rules_and_chain_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    let hello = id("hello").to_string();
    let leaf = ca
        .sign(
            &id("hello"),
            &csr(&[&format!("uri:{hello}")]),
            Duration::from_secs(3600),
        )
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain_der[0]).unwrap();

    let mut uris = Vec::new();
    let (mut ca_flag, mut digital_signature, mut server, mut client) = (None, false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => ca_flag = Some(bc.ca),
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical, "key usage is critical");
                digital_signature = ku.digital_signature();
                assert!(!ku.key_cert_sign());
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                (server, client) = (eku.server_auth, eku.client_auth)
            }
            _ => {}
        }
    }
    assert_eq!(uris, [hello]);
    assert_eq!(ca_flag, Some(false), "a leaf is not a CA");
    assert!(digital_signature && server && client);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert!(
        (now - 70..=now - 50).contains(&not_before),
        "backdated ~60 s"
    );
    assert!((now + 3590..=now + 3610).contains(&not_after));

    // leaf → issuer → root, checked with x509-parser…
    let (_, issuer) = x509_parser::parse_x509_certificate(&leaf.chain_der[1]).unwrap();
    cert.verify_signature(Some(issuer.public_key())).unwrap();
    let roots = ca.trust_anchors_der();
    let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();

    // …and with openssl, an independent implementation, where installed.
    if which("openssl") {
        let pem = |der: &[u8]| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                base64(der)
            )
        };
        std::fs::write(dir.path().join("leaf.pem"), pem(&leaf.chain_der[0])).unwrap();
        std::fs::write(dir.path().join("chain.pem"), pem(&leaf.chain_der[1])).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(dir.path().join("bundle.crt"))
            .arg("-untrusted")
            .arg(dir.path().join("chain.pem"))
            .arg(dir.path().join("leaf.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(std::env::var("CI").is_err(), "CI must install openssl");
    }
}

fn which(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("version")
        .output()
        .is_ok()
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn csrs_asking_for_anything_else_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    let hello = id("hello");
    let lifetime = Duration::from_secs(60);
    for sans in [
        vec!["uri:spiffe://cluster.local/ns/default/sa/admin".to_string()],
        vec![format!("uri:{hello}"), "dns:hello.default.svc".to_string()],
        vec![],
    ] {
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let err = ca.sign(&hello, &csr(&sans), lifetime).unwrap_err();
        assert!(matches!(err, CaError::WrongSan { .. }), "{sans:?}: {err}");
    }
    let foreign = SpiffeId::new("evil.example", "default", "hello");
    let err = ca
        .sign(&foreign, &csr(&[&format!("uri:{foreign}")]), lifetime)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    assert!(matches!(
        ca.sign(&hello, b"garbage", lifetime),
        Err(CaError::BadCsr(_))
    ));
}

#[tokio::test]
async fn the_service_refuses_with_a_reason_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::sync::Arc::new(Ca::load_or_create(dir.path(), "cluster.local").unwrap());
    let tokens = std::sync::Arc::new(BootstrapTokens::load_or_create(dir.path()).unwrap());
    let metrics = std::sync::Arc::new(crate::metrics::ControllerMetrics::new());
    let service = IdentityService::new(
        ca,
        Authenticator::BootstrapTokens(tokens.clone()),
        Duration::from_secs(60),
        metrics.clone(),
    );
    let hello = id("hello");
    let request = |token: String| {
        Request::new(CertifyRequest {
            identity: hello.to_string(),
            token,
            csr_der: csr(&[&format!("uri:{hello}")]),
        })
    };
    let status = service
        .certify(request(tokens.token_for(&id("frontend"))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().starts_with(
            "identity-mismatch: the token does not prove identity spiffe://cluster.local/ns/default/sa/hello"
        ),
        "{}",
        status.message()
    );
    let status = service
        .certify(request("not-hex".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().starts_with("invalid-token: "),
        "{}",
        status.message()
    );
    let foreign = SpiffeId::new("evil.example", "default", "hello");
    let status = service
        .certify(Request::new(CertifyRequest {
            identity: foreign.to_string(),
            token: tokens.token_for(&foreign),
            csr_der: csr(&[&format!("uri:{foreign}")]),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().starts_with("foreign-trust-domain: "),
        "{}",
        status.message()
    );
    let refused = |reason: &str| {
        metrics
            .certificates_refused
            .with_label_values(&[reason])
            .get()
    };
    assert_eq!(
        [
            refused("identity-mismatch"),
            refused("invalid-token"),
            refused("foreign-trust-domain")
        ],
        [1, 1, 1]
    );

    let response = service
        .certify(request(tokens.token_for(&hello)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.chain_der.len(), 2);
    assert_eq!(response.trust_anchors_der.len(), 1);
    assert_eq!(metrics.certificates_issued.get(), 1);
}

#[test]
fn an_expired_issuer_never_signs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    rotate_issuer(dir.path(), Duration::from_secs(1)).unwrap();
    assert!(reload(&ca, dir.path()).unwrap());
    std::thread::sleep(Duration::from_millis(1100));
    let err = ca.healthy().unwrap_err();
    assert!(
        err.to_string()
            .contains("issuer.crt: the issuer certificate is not valid now"),
        "{err}"
    );
    let hello = id("hello");
    let err = ca
        .sign(
            &hello,
            &csr(&[&format!("uri:{hello}")]),
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(matches!(err, CaError::IssuerExpired { .. }), "{err}");
}

#[test]
fn keys_are_private_and_the_ca_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    BootstrapTokens::load_or_create(dir.path()).unwrap();
    for key in ["root.key", "issuer.key", "bootstrap.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let again = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    assert_eq!(first.trust_anchors_der(), again.trust_anchors_der());
    assert!(Ca::load_or_create(dir.path(), "Bad Domain").is_err());
}

#[test]
fn issuer_and_root_rotation_keep_the_chain_valid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    let hello = id("hello");
    let sign = |ca: &Ca| {
        ca.sign(
            &hello,
            &csr(&[&format!("uri:{hello}")]),
            Duration::from_secs(60),
        )
        .unwrap()
        .chain_der
    };
    let chains_to = |chain: &[Vec<u8>], root: &[u8]| {
        let (_, issuer) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(root).unwrap();
        issuer.verify_signature(Some(root.public_key())).is_ok()
    };
    let before = sign(&ca);
    let old_root = ca.trust_anchors_der()[0].clone();

    rotate_issuer(dir.path(), Duration::from_secs(3600)).unwrap();
    assert!(reload(&ca, dir.path()).unwrap());
    let after = sign(&ca);
    assert_ne!(before[1], after[1], "a new issuer signs");
    assert!(chains_to(&after, &old_root));

    add_root(dir.path()).unwrap();
    reload(&ca, dir.path()).unwrap();
    assert_eq!(ca.trust_anchors_der().len(), 2);
    activate_next_root(dir.path()).unwrap();
    reload(&ca, dir.path()).unwrap();
    let new_root = ca.trust_anchors_der()[1].clone();
    let rotated = sign(&ca);
    assert!(chains_to(&rotated, &new_root) && !chains_to(&rotated, &old_root));
    retire_old_roots(dir.path()).unwrap();
    reload(&ca, dir.path()).unwrap();
    assert_eq!(ca.trust_anchors_der(), [new_root]);

    // A new issuer that does not chain to the bundle is refused; the old one keeps signing.
    std::fs::copy(dir.path().join("root.crt"), dir.path().join("issuer.crt")).unwrap();
    assert!(reload(&ca, dir.path()).is_err());
    sign(&ca);
}

#[test]
fn the_serving_certificate_names_the_controller_and_follows_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::sync::Arc::new(Ca::load_or_create(dir.path(), "cluster.local").unwrap());
    let controller = SpiffeId::default_controller("cluster.local");
    let lifetime = Duration::from_secs(3600);
    let (serving, renew_at) =
        ServingCertificate::new(ca.clone(), controller, Vec::new(), lifetime).unwrap();
    let first = serving.chain_der();
    let (_, leaf) = x509_parser::parse_x509_certificate(&first[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        r#"[URI("spiffe://cluster.local/ns/trellis/sa/trellis-controller")]"#
    );
    let in_secs = renew_at
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((2500..=2520).contains(&in_secs), "renews at 70%: {in_secs}");

    rotate_issuer(dir.path(), lifetime).unwrap();
    assert!(reload(&ca, dir.path()).unwrap());
    serving.renew().unwrap();
    let second = serving.chain_der();
    assert_ne!(first[1], second[1], "signed by the new issuer");
    let (_, issuer) = x509_parser::parse_x509_certificate(&second[1]).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&second[0]).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).unwrap();
    assert!(serving
        .server_config()
        .unwrap()
        .alpn_protocols
        .contains(&b"h2".to_vec()));
}

#[test]
fn the_webhook_certificate_names_its_service_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::sync::Arc::new(Ca::load_or_create(dir.path(), "cluster.local").unwrap());
    let names = vec![
        "trellis-webhook.trellis.svc".to_string(),
        "trellis-webhook.trellis.svc.cluster.local".to_string(),
    ];
    let controller = SpiffeId::default_controller("cluster.local");
    let (serving, _) =
        ServingCertificate::new(ca.clone(), controller, names, Duration::from_secs(60)).unwrap();
    let chain = serving.chain_der();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        r#"[URI("spiffe://cluster.local/ns/trellis/sa/trellis-controller"), DNSName("trellis-webhook.trellis.svc"), DNSName("trellis-webhook.trellis.svc.cluster.local")]"#
    );
    let config = serving.https_server_config().unwrap();
    assert_eq!(
        config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    assert_eq!(
        ca.bundle_pem(),
        std::fs::read_to_string(dir.path().join("bundle.crt")).unwrap()
    );
}
