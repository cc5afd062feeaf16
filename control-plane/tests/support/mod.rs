//! A controller started in-process on loopback, and discovery clients for it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;
use trellis_control_plane::controller::{Controller, ControllerConfig};
use trellis_proto::discovery::discovery_client::DiscoveryClient;
use trellis_proto::discovery::WatchRequest;

/// The Service `hello` with two endpoints.
pub const HELLO: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.3]}, {addresses: [127.0.0.4]}]
ports: [{port: 8080}]
";

/// Starts a controller serving `dir/manifests`, written from `files`
/// (name, contents) first.
pub async fn start(dir: &Path, files: &[(&str, &str)]) -> Controller {
    std::fs::create_dir(dir.join("manifests")).unwrap();
    for (name, contents) in files {
        std::fs::write(dir.join("manifests").join(name), contents).unwrap();
    }
    Controller::start(ControllerConfig {
        leaf_lifetime: Duration::from_secs(60),
        ..ControllerConfig::local(dir, [127, 0, 0, 1].into())
    })
    .await
    .unwrap()
}

/// A discovery client on a connection of its own.
pub async fn connect(addr: SocketAddr) -> DiscoveryClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    DiscoveryClient::new(channel)
}

pub fn request(authority: &str) -> WatchRequest {
    WatchRequest {
        authority: authority.into(),
        client_identity: "spiffe://cluster.local/ns/default/sa/test".into(),
    }
}

/// The controller's `/metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("http://{admin}/metrics").parse().unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of one series (`name{labels}` exactly as exposed).
pub fn series(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
