//! The workload certificate authority: an issuer and the trust bundle of
//! roots it chains to. In local mode they are files in the state directory
//! (keys 0600, with the root that signs issuers); in cluster mode a Secret
//! and a ConfigMap (`cluster_issuer.rs`). Either way every change goes
//! through [`Ca::replace`], which checks the new issuer and swaps it in or
//! refuses it, so the issuer and the roots rotate without restarting
//! anything and a bad replacement never stops signing.
//!
//! Leaves follow the SPIFFE X.509-SVID spec:
//! <https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use trellis_proto::SpiffeId;

/// Files of the CA in its directory.
pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
pub const NEXT_ROOT_CERT: &str = "root-next.crt";
pub const NEXT_ROOT_KEY: &str = "root-next.key";
pub const ISSUER_CERT: &str = "issuer.crt";
pub const ISSUER_KEY: &str = "issuer.key";
pub const BUNDLE: &str = "bundle.crt";

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest leaf lifetime: a leaf never outlives its issuer, and a bound
/// keeps every validity computed from it representable.
pub const MAX_LEAF_LIFETIME: Duration = ISSUER_LIFETIME;

/// A certificate lifetime the CA can sign: above zero and within what its
/// signer lives (so every validity computed from it is representable).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    #[error(transparent)]
    Unreadable(#[from] trellis_common::duration::InvalidDuration),
    #[error("{lifetime:?} is out of range; use a lifetime above 0s and at most {}h (its signer's lifetime), e.g. 24h", .max.as_secs() / 3600)]
    OutOfRange { lifetime: Duration, max: Duration },
}

/// Parses `--leaf-lifetime`: a duration (`24h`, `30s`) of at most
/// [`MAX_LEAF_LIFETIME`].
pub fn parse_leaf_lifetime(s: &str) -> Result<Duration, LifetimeError> {
    parse_lifetime(s, MAX_LEAF_LIFETIME)
}

/// Parses an issuer's lifetime (`meshctl ca rotate-issuer --lifetime`): at
/// most the root's.
pub fn parse_issuer_lifetime(s: &str) -> Result<Duration, LifetimeError> {
    parse_lifetime(s, ROOT_LIFETIME)
}

fn parse_lifetime(s: &str, max: Duration) -> Result<Duration, LifetimeError> {
    let lifetime = trellis_common::duration::parse(s)?;
    if lifetime.is_zero() || lifetime > max {
        return Err(LifetimeError::OutOfRange { lifetime, max });
    }
    Ok(lifetime)
}
/// Leaves start a little in the past, so peers with a slow clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CA file or object (named by `origin`) does not hold what it should.
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("trust domain {0:?} is invalid: use lowercase letters, digits, '-', '.' and '_'")]
    TrustDomain(String),
    /// The issuer is expired or not yet valid: signing with it would hand
    /// out certificates no peer accepts.
    #[error("{origin}: the issuer certificate is not valid now (valid until {not_after} unix); rotate it (local mode: `meshctl ca rotate-issuer`) or replace it with a valid one")]
    IssuerExpired { origin: String, not_after: u64 },
    /// The CSR cannot be parsed or its signature is wrong.
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    BadCsr(String),
    /// The CSR asks for something else than the proven identity.
    #[error("the CSR must carry exactly one SAN, the URI {expected}; it has {found}")]
    WrongSan { expected: String, found: String },
    /// The identity is in another trust domain.
    #[error("identity {identity} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    /// rcgen refused to build a certificate.
    #[error("cannot build a certificate: {0}")]
    Build(#[from] rcgen::Error),
    /// rustls cannot use the key generated for the controller's own certificate.
    #[error("cannot use the controller's serving key: {0}")]
    ServingKey(rustls::Error),
}

/// A signed leaf: the chain (leaf, issuer) and its expiry.
#[derive(Clone, Debug)]
pub struct SignedLeaf {
    pub chain_der: Vec<Vec<u8>>,
    pub valid_until: SystemTime,
}

/// One PEM text of the CA and where it came from, for errors: a file's
/// path, or a key of a Kubernetes object.
#[derive(Clone, PartialEq, Eq)]
pub struct PemText {
    pub origin: String,
    pub text: String,
}

/// What the CA signs with, wherever it is kept: the issuer's certificate
/// and key, and the bundle of roots the issuer must chain to.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuerMaterial {
    pub cert: PemText,
    pub key: PemText,
    pub bundle: PemText,
}

impl std::fmt::Debug for IssuerMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IssuerMaterial")
            .field("cert", &self.cert.origin)
            .field("bundle", &self.bundle.origin)
            .finish_non_exhaustive()
    }
}

impl IssuerMaterial {
    /// The issuer and bundle files of a local-mode state directory.
    pub fn from_dir(dir: &Path) -> Result<Self, CaError> {
        let pem = |file: &str| -> Result<PemText, CaError> {
            let path = dir.join(file);
            Ok(PemText {
                text: read(&path)?,
                origin: path.display().to_string(),
            })
        };
        Ok(Self {
            cert: pem(ISSUER_CERT)?,
            key: pem(ISSUER_KEY)?,
            bundle: pem(BUNDLE)?,
        })
    }
}

/// The issuer and bundle currently in use.
struct Active {
    issuer_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// What it was made from, to notice changes.
    material: IssuerMaterial,
    anchors_der: Vec<Vec<u8>>,
}

pub struct Ca {
    trust_domain: String,
    active: ArcSwap<Active>,
    /// Counts the issuers swapped in, so users of the CA (the serving
    /// certificate) notice a rotation.
    generation: AtomicU64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("issuer", &self.active.load().material.cert.origin)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A CA for `trust_domain` signing with `material`, if it passes the
    /// checks of [`replace`](Self::replace).
    pub fn new(trust_domain: &str, material: IssuerMaterial) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            active: ArcSwap::from_pointee(load(material)?),
            generation: AtomicU64::new(0),
        })
    }

    /// Opens the CA in `dir`, creating a root, an issuer and a bundle on first start.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !dir.join(ROOT_CERT).exists() {
            let (root_pem, root_key) = create_root()?;
            write_file(
                &dir.join(ROOT_KEY),
                root_key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_file(&dir.join(ROOT_CERT), root_pem.as_bytes(), 0o644)?;
            write_file(&dir.join(BUNDLE), root_pem.as_bytes(), 0o644)?;
            tracing::info!(dir = %dir.display(), "created a new root CA");
        }
        if !dir.join(ISSUER_CERT).exists() {
            rotate_issuer(dir, ISSUER_LIFETIME)?;
        }
        Self::new(trust_domain, IssuerMaterial::from_dir(dir)?)
    }

    /// Signs with `material` from now on if it differs from the current
    /// one and is good: the key belongs to the certificate, and the
    /// certificate is a CA signed by a root of the bundle. Returns whether
    /// anything changed. A bad replacement is refused and the current
    /// issuer keeps signing.
    pub fn replace(&self, material: IssuerMaterial) -> Result<bool, CaError> {
        if material == self.active.load().material {
            return Ok(false);
        }
        self.active.store(Arc::new(load(material)?));
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Changes with every issuer or bundle swapped in.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots peers must trust, DER.
    pub fn trust_anchors_der(&self) -> Vec<Vec<u8>> {
        self.active.load().anchors_der.clone()
    }

    /// The bundle of roots, PEM, as peers are given it (an injected
    /// proxy's `TRELLIS_CONTROLLER_TRUST_PEM`, a webhook's caBundle).
    pub fn bundle_pem(&self) -> String {
        self.active.load().material.bundle.text.clone()
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.active.load().not_after
    }

    /// Fails when the issuer cannot sign (expired or not yet valid).
    pub fn healthy(&self) -> Result<(), CaError> {
        let active = self.active.load();
        let now = SystemTime::now();
        if now < active.not_before || now >= active.not_after {
            return Err(CaError::IssuerExpired {
                origin: active.material.cert.origin.clone(),
                not_after: unix(active.not_after),
            });
        }
        Ok(())
    }

    /// Signs a leaf for `identity` from `csr_der`, valid for `lifetime` (but
    /// never past the issuer).
    pub fn sign(
        &self,
        identity: &SpiffeId,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<SignedLeaf, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let expected = identity.to_string();
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(describe_san)
            .collect();
        if sans != [format!("URI:{expected}")] {
            return Err(CaError::WrongSan {
                expected,
                found: if sans.is_empty() {
                    "none".into()
                } else {
                    sans.join(", ")
                },
            });
        }
        self.leaf(identity, &[], &csr.public_key, lifetime)
    }

    /// A fresh key and a leaf for it, for the controller's own serving
    /// certificates: the key never leaves the process, so no CSR is needed.
    /// `dns_names` are added as DNS SANs (the webhook's Service names, which
    /// the API server verifies).
    pub fn issue(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<(SignedLeaf, KeyPair), CaError> {
        let key = KeyPair::generate()?;
        Ok((self.leaf(identity, dns_names, &key, lifetime)?, key))
    }

    /// Signs an X.509-SVID for `identity` (and `dns_names`) over `public_key`.
    fn leaf(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<SignedLeaf, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        self.healthy()?;
        let expected = identity.to_string();
        let active = self.active.load();
        let now = SystemTime::now();
        // Past the issuer (or past what a SystemTime holds) is the issuer's end.
        let not_after = now
            .checked_add(lifetime)
            .map_or(active.not_after, |end| end.min(active.not_after));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(expected.as_str().try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(public_key, &active.issuer)?;
        Ok(SignedLeaf {
            chain_der: vec![leaf.der().to_vec(), active.issuer_der.clone()],
            valid_until: not_after,
        })
    }
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(email) => format!("email:{}", email.as_str()),
        other => format!("{other:?}"),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    // Positive, non-zero (RFC 5280 §4.1.2.2).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from(bytes.to_vec())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn ca_params(common_name: &str, path_len: Option<u8>, lifetime: Duration) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Trellis");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(path_len.map_or(
        BasicConstraints::Unconstrained,
        BasicConstraints::Constrained,
    ));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial());
    // RFC 5280 §4.2.1.1: strict verifiers (openssl -x509_strict) require it.
    params.use_authority_key_identifier_extension = true;
    params
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    let valid = !trust_domain.is_empty()
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(CaError::TrustDomain(trust_domain.to_string()))
    }
}

fn create_root() -> Result<(String, KeyPair), CaError> {
    let key = KeyPair::generate()?;
    let name = format!("Trellis root CA {}", unix(SystemTime::now()));
    let cert = ca_params(&name, None, ROOT_LIFETIME).self_signed(&key)?;
    Ok((cert.pem(), key))
}

/// Writes a new issuer, signed by the current root, valid for `lifetime`.
pub fn rotate_issuer(dir: &Path, lifetime: Duration) -> Result<(), CaError> {
    let root = read(&dir.join(ROOT_CERT))?;
    let root_key = read_key(&dir.join(ROOT_KEY))?;
    let root = Issuer::from_ca_cert_pem(&root, root_key)
        .map_err(|e| invalid(dir.join(ROOT_CERT).display(), e))?;
    let key = KeyPair::generate()?;
    let name = format!("Trellis issuer {}", unix(SystemTime::now()));
    let cert = ca_params(&name, Some(0), lifetime).signed_by(&key, &root)?;
    // Key first: a reader that sees the new certificate finds its key.
    write_file(&dir.join(ISSUER_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(ISSUER_CERT), cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "issued a new issuer certificate");
    Ok(())
}

/// Step 1 of a root rotation: a new root joins the bundle (proxies learn it
/// at their next renewal); the current root still signs.
pub fn add_root(dir: &Path) -> Result<(), CaError> {
    let (pem, key) = create_root()?;
    write_file(
        &dir.join(NEXT_ROOT_KEY),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&dir.join(NEXT_ROOT_CERT), pem.as_bytes(), 0o644)?;
    let bundle = read(&dir.join(BUNDLE))?;
    write_file(
        &dir.join(BUNDLE),
        format!("{bundle}{pem}").as_bytes(),
        0o644,
    )
}

/// Step 2: the new root becomes current and signs a new issuer. The bundle
/// keeps both roots, so leaves from either chain are accepted meanwhile.
pub fn activate_next_root(dir: &Path) -> Result<(), CaError> {
    let cert = read(&dir.join(NEXT_ROOT_CERT))?;
    let key = read(&dir.join(NEXT_ROOT_KEY))?;
    write_file(&dir.join(ROOT_KEY), key.as_bytes(), 0o600)?;
    write_file(&dir.join(ROOT_CERT), cert.as_bytes(), 0o644)?;
    for file in [NEXT_ROOT_CERT, NEXT_ROOT_KEY] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    rotate_issuer(dir, ISSUER_LIFETIME)
}

/// Step 3, once every leaf has been renewed: only the current root is trusted.
pub fn retire_old_roots(dir: &Path) -> Result<(), CaError> {
    let root = read(&dir.join(ROOT_CERT))?;
    write_file(&dir.join(BUNDLE), root.as_bytes(), 0o644)
}

/// Checks `material` and makes the issuer it holds.
fn load(material: IssuerMaterial) -> Result<Active, CaError> {
    let IssuerMaterial { cert, key, bundle } = &material;
    let issuer_der = pem_blocks(&cert.text, &cert.origin)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&cert.origin, "no certificate"))?;
    let anchors_der = pem_blocks(&bundle.text, &bundle.origin)?;
    if anchors_der.is_empty() {
        return Err(invalid(&bundle.origin, "no root certificate"));
    }
    let key_pair = KeyPair::from_pem(&key.text).map_err(|e| invalid(&key.origin, e))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| invalid(&cert.origin, e))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
        return Err(invalid(
            &key.origin,
            format!("this key does not belong to {}", cert.origin),
        ));
    }
    // The issuer must chain to a root the bundle holds, or no peer trusts its leaves.
    let chains = anchors_der.iter().any(|root| {
        x509_parser::parse_x509_certificate(root)
            .is_ok_and(|(_, root)| parsed.verify_signature(Some(root.public_key())).is_ok())
    });
    if !chains {
        return Err(invalid(
            &cert.origin,
            format!("the issuer is not signed by any root in {}", bundle.origin),
        ));
    }
    let time = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let not_before = time(parsed.validity().not_before);
    let not_after = time(parsed.validity().not_after);
    let issuer = Issuer::from_ca_cert_der(&issuer_der.clone().into(), key_pair)
        .map_err(|e| invalid(&cert.origin, e))?;
    Ok(Active {
        issuer_der,
        issuer,
        not_before,
        not_after,
        material,
        anchors_der,
    })
}

fn pem_blocks(text: &str, origin: &str) -> Result<Vec<Vec<u8>>, CaError> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|block| {
            block
                .map(|b| b.contents)
                .map_err(|e| invalid(origin, format!("bad PEM: {e}")))
        })
        .collect()
}

fn invalid(origin: impl std::fmt::Display, reason: impl std::fmt::Display) -> CaError {
    CaError::Invalid {
        origin: origin.to_string(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read(path)?).map_err(|e| invalid(path.display(), e))
}

/// Writes atomically (temporary file + rename) with `mode`, so a reader
/// never sees half a file and a key is never readable by others.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp~");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
