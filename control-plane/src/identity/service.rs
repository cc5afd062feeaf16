//! The Identity gRPC service: checks the proof, then signs the CSR.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use trellis_proto::identity::identity_server::{Identity, IdentityServer};
use trellis_proto::identity::{CertifyRequest, CertifyResponse};
use trellis_proto::SpiffeId;

use super::ca::{Ca, CaError};
use super::tokens::BootstrapTokens;
use crate::metrics::ControllerMetrics;

pub struct IdentityService {
    ca: Arc<Ca>,
    tokens: Arc<BootstrapTokens>,
    leaf_lifetime: Duration,
    metrics: Arc<ControllerMetrics>,
}

impl IdentityService {
    pub fn new(
        ca: Arc<Ca>,
        tokens: Arc<BootstrapTokens>,
        leaf_lifetime: Duration,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        Self {
            ca,
            tokens,
            leaf_lifetime,
            metrics,
        }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    fn refuse(&self, identity: &str, status: Status) -> Status {
        self.metrics.certificates_refused.inc();
        tracing::warn!(%identity, reason = %status.message(), "certificate refused");
        status
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let request = request.into_inner();
        let identity: SpiffeId =
            request
                .identity
                .parse()
                .map_err(|e: trellis_proto::InvalidSpiffeId| {
                    self.refuse(&request.identity, Status::invalid_argument(e.to_string()))
                })?;
        if !self.tokens.verify(&identity, &request.token) {
            let message = format!("the bootstrap token does not prove identity {identity}");
            return Err(self.refuse(&request.identity, Status::permission_denied(message)));
        }
        let leaf = self
            .ca
            .sign(&identity, &request.csr_der, self.leaf_lifetime)
            .map_err(|e| {
                let status = match &e {
                    CaError::IssuerExpired { .. } => Status::unavailable(e.to_string()),
                    CaError::ForeignTrustDomain { .. } => Status::permission_denied(e.to_string()),
                    CaError::BadCsr(_) | CaError::WrongSan { .. } => {
                        Status::invalid_argument(e.to_string())
                    }
                    _ => Status::internal(e.to_string()),
                };
                self.refuse(&request.identity, status)
            })?;
        self.metrics.certificates_issued.inc();
        tracing::debug!(%identity, "certificate issued");
        Ok(Response::new(CertifyResponse {
            chain_der: leaf.chain_der,
            trust_anchors_der: self.ca.trust_anchors_der(),
            valid_until_unix: leaf
                .valid_until
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        }))
    }
}
