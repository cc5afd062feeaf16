//! A throwaway CA for tests (root → intermediate → leaves from proxies' CSRs), independent of the controller's.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use trellis_proto::SpiffeId;
use x509_parser::time::ASN1Time;

use super::{generate_csr, TlsConfigs};

pub(crate) struct TestCa {
    root_der: Vec<u8>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root")),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate")),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Self {
            root_der: root.der().to_vec(),
            intermediate,
        }
    }

    pub(crate) fn trust_anchors(&self) -> Vec<Vec<u8>> {
        vec![self.root_der.clone()]
    }

    /// Signs `csr_der` as a workload leaf valid between the two Unix times;
    /// returns the chain, leaf first. The SANs are copied from the CSR.
    pub(crate) fn sign(&self, csr_der: &[u8], not_before: i64, not_after: i64) -> Vec<Vec<u8>> {
        let mut csr = CertificateSigningRequestParams::from_der(&csr_der.into()).unwrap();
        csr.params.not_before = ASN1Time::from_timestamp(not_before).unwrap().to_datetime();
        csr.params.not_after = ASN1Time::from_timestamp(not_after).unwrap().to_datetime();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = csr.signed_by(&self.intermediate).unwrap();
        vec![leaf.der().to_vec(), self.intermediate.der().to_vec()]
    }

    /// Configurations for `identity`, valid for the hour around now.
    pub(crate) fn configs(&self, identity: &SpiffeId) -> TlsConfigs {
        let now = unix_now();
        self.configs_valid(identity, now - 3600, now + 3600)
    }

    /// Configurations for `identity` with a leaf valid between two Unix times.
    pub(crate) fn configs_valid(
        &self,
        identity: &SpiffeId,
        not_before: i64,
        not_after: i64,
    ) -> TlsConfigs {
        let (key, csr) = generate_csr(identity).unwrap();
        let chain = self.sign(&csr, not_before, not_after);
        TlsConfigs::new(identity.clone(), chain, &key, self.trust_anchors()).unwrap()
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub(crate) fn spiffe(service_account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", service_account)
}
