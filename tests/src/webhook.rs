//! A client of the injection webhook as the API server is one: HTTPS that
//! verifies the webhook's certificate against a caBundle and a Service's
//! DNS name, and AdmissionReviews of the shape the API server sends.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// The name the API server dials the chart's webhook by.
pub const SERVICE_NAME: &str = "trellis-webhook.trellis.svc";

/// One HTTP/1.1 connection to the webhook.
pub struct WebhookClient {
    sender: SendRequest<Full<Bytes>>,
    /// The name the certificate was verified for, sent as `Host`.
    host: String,
}

/// A TLS client configuration trusting `ca_bundle` (PEM) only.
pub fn client_config(ca_bundle: &str) -> Arc<rustls::ClientConfig> {
    try_client_config(ca_bundle.as_bytes()).expect("a PEM bundle of CA certificates")
}

/// Like [`client_config`], saying what is wrong with a bad bundle (as the
/// API server does with a webhook's caBundle).
pub fn try_client_config(ca_bundle: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle) {
        let cert = cert.map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA bundle has an unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("x509: certificate signed by unknown authority (no CA certificate)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl WebhookClient {
    /// Connects to `addr`, verifying the certificate for `server_name`.
    pub async fn connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {addr} as {server_name}: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: server_name.to_string(),
        })
    }

    /// POSTs `body` to `path`: the status and the body of the answer.
    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), String> {
        let request = http::Request::post(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Sends `review` to `/inject` and parses the answer (status 200).
    pub async fn review(&mut self, review: &Value) -> Result<Value, String> {
        let (status, body) = self
            .post("/inject", serde_json::to_vec(review).expect("JSON"))
            .await?;
        if status != 200 {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}

/// An AdmissionReview `admission.k8s.io/v1` for the CREATE of `pod` in
/// `namespace`, as the API server sends it.
pub fn pod_review(uid: &str, namespace: &str, pod: Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "3b1e1c1a-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
}

/// A pod as a ReplicaSet creates it: no name yet, labels, a service account.
pub fn hello_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": "hello", "version": "v1", "pod-template-hash": "5d9c7b"},
        },
        "spec": {
            "serviceAccountName": "hello",
            "containers": [{
                "name": "hello",
                "image": "ghcr.io/trellis-mesh/hello:1",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
        },
    })
}
