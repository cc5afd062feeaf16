//! The Identity gRPC service: authenticates the request, then signs the CSR.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use trellis_proto::identity::identity_server::{Identity, IdentityServer};
use trellis_proto::identity::{CertifyRequest, CertifyResponse};
use trellis_proto::SpiffeId;

use super::authenticator::{Authenticator, Refusal};
use super::ca::{Ca, SignedLeaf};
use crate::metrics::ControllerMetrics;

pub struct IdentityService {
    ca: Arc<Ca>,
    authenticator: Arc<Authenticator>,
    leaf_lifetime: Duration,
    metrics: Arc<ControllerMetrics>,
}

impl IdentityService {
    pub fn new(
        ca: Arc<Ca>,
        authenticator: impl Into<Arc<Authenticator>>,
        leaf_lifetime: Duration,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        Self {
            ca,
            authenticator: authenticator.into(),
            leaf_lifetime,
            metrics,
        }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn certify(&self, request: &CertifyRequest) -> Result<SignedLeaf, Refusal> {
        let identity: SpiffeId = request.identity.parse()?;
        self.authenticator
            .authenticate(&identity, &request.token)
            .await?;
        Ok(self
            .ca
            .sign(&identity, &request.csr_der, self.leaf_lifetime)?)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let request = request.into_inner();
        let leaf = match IdentityService::certify(self, &request).await {
            Ok(leaf) => leaf,
            Err(refusal) => {
                self.metrics
                    .certificates_refused
                    .with_label_values(&[refusal.reason()])
                    .inc();
                tracing::warn!(identity = %request.identity, reason = refusal.reason(), error = %refusal, "certificate refused");
                return Err(refusal.status());
            }
        };
        self.metrics.certificates_issued.inc();
        tracing::debug!(identity = %request.identity, "certificate issued");
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
